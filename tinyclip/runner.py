"""Running the encoders fast and exactly: shape buckets, a TinyJit per bucket,
and text cut to the longest real length.

- Batches are padded up to a power-of-two bucket (1, 2, 4, ... up to the batch
  size), so any batch size reuses a compiled graph; padded rows are dropped
  from the output. Rows never interact in CLIP, so this is exact.
- Texts run only up to the last position any row pools from (its first eos),
  rounded up to a multiple of TEXT_STEP. The causal mask means no position
  sees a later one, so the states up to there are exactly those of the full
  context.
- Each (tower, batch bucket, text length) gets its own TinyJit, captured on
  its second call; tinygrad's kernel cache keeps the compiled kernels on disk
  between processes.
"""
from __future__ import annotations

import threading

import numpy as np
from tinygrad import Tensor, TinyJit

from . import _tinygrad

TEXT_STEP = 8


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at `limit` (n <= limit)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(limit, n))


class Runner:
    """Encodes numpy batches with a model; one per loaded CLIP, guarded by a lock
    because tinygrad's scheduler and JIT are not thread-safe."""

    def __init__(self, model, backend, jit: bool = True):
        self.model, self.backend, self.jit = model, backend, jit
        self._jits: dict[tuple, object] = {}
        self.lock = threading.RLock()

    def _run(self, key: tuple, fn, x: np.ndarray) -> np.ndarray:
        with self.lock, self.backend.context():
            t = _tinygrad.to_tensor(x, self.backend.device)
            if not self.jit:
                return _tinygrad.as_float32(fn(t))
            if key not in self._jits:
                self._jits[key] = TinyJit(lambda inp: fn(inp).float().realize())
            return self._jits[key](t).numpy().copy()

    def image_features(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), batch_size):
            chunk = pixels[i:i + batch_size]
            b = bucket(len(chunk), batch_size)
            padded = np.zeros((b, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            out.append(self._run(("image", b), self.model.get_image_features, padded)[:len(chunk)])
        return np.concatenate(out)

    def text_features(self, ids: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        context = ids.shape[1]
        for i in range(0, len(ids), batch_size):
            chunk = ids[i:i + batch_size]
            length = min(context, -(-(int(self.pool_positions(chunk).max()) + 1) // TEXT_STEP) * TEXT_STEP)
            b = bucket(len(chunk), batch_size)
            padded = np.zeros((b, length), np.int32)
            padded[:len(chunk)] = chunk[:, :length]
            padded[len(chunk):] = chunk[0, :length]   # any valid row; dropped below
            out.append(self._run(("text", b, length), self.model.get_text_features, padded)[:len(chunk)])
        return np.concatenate(out)

    def pool_positions(self, ids: np.ndarray) -> np.ndarray:
        """Where each row pools from, by the rule of CLIPTextTransformer.pool_weights."""
        eos = self.model.config.text_config.eos_token_id
        hit = ids == (ids.max(-1, keepdims=True) if eos == 2 else eos)
        return np.where(hit.any(-1), hit.argmax(-1), 0)
