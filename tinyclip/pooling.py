"""Which token's state is a text's embedding: the rule, once, for numpy ids and for tinygrad Tensors.

Like transformers: the first `eos_token_id`, or, for legacy configs with eos_token_id == 2, the
first occurrence of the largest id (modeling_clip.py, CLIPTextTransformer.forward, "PR #24773";
CLIP's end-of-text token is the last of its vocabulary). A row without a match pools position 0,
as torch's argmax of all-False does. The model pools in-graph with `one_hot`; the runner, which
cuts a batch to the last position any row pools from, uses `positions` on the host. A test checks
that the two agree.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

LEGACY_EOS = 2      # an eos_token_id meaning "pool at the largest id"


def positions(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """(N,) positions each row of (N, T) ids pools from."""
    hit = ids == (ids.max(-1, keepdims=True) if eos_token_id == LEGACY_EOS else eos_token_id)
    return np.where(hit.any(-1), hit.argmax(-1), 0)


def one_hot(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """(B, T) int32, 1 at the position each row pools from: `positions` as a Tensor expression."""
    ids = input_ids.cast(dtypes.int32)
    target = ids.max(-1, keepdim=True) if eos_token_id == LEGACY_EOS else eos_token_id
    hit = (ids == target).cast(dtypes.int32)
    first = hit * (hit.cumsum(-1) == 1).cast(dtypes.int32)
    none = (hit.sum(-1, keepdim=True) == 0).cast(dtypes.int32)
    pos0 = (Tensor.ones(1, ids.shape[-1], device=ids.device, dtype=dtypes.int32).cumsum(-1) == 1).cast(dtypes.int32)
    return first + none * pos0
