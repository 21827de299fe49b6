"""L2 normalisation of embedding rows in numpy, the one copy every caller uses.

(model.CLIPModel.logits normalises Tensors on the device; this is its numpy counterpart.)
"""
from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """`x` (..., D) with each row divided by its L2 norm, in `x`'s dtype.

    A row of zeros stays zeros rather than becoming NaN: an all-zero embedding has no
    direction, and a NaN would spread through every score it meets.
    """
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1, norm).astype(x.dtype, copy=False)
