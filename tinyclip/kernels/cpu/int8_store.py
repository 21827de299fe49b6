"""Quantised weights kept on disk, so that a checkpoint's linear layers are quantised once, not at every load.

One file per (checkpoint fingerprint, tower, int8 layout) under the CPU kernels' cache folder (each tower's
weights are arranged when the tower is first used: tinyclip/towers.py):

    $TINYCLIP_CACHE_DIR/cpu/int8/<sha256 of the key>.npz    (default: ~/.cache/tinyclip/cpu/int8)

holding `key` (the key as JSON, checked on reading) and `w0`, `w1`, ... the uint8 arrays int8.quantise
made, in the order the model prepares the tower's linear layers. Plain numpy arrays read with allow_pickle=False
(zip members carry a CRC, checked on reading), through trust.read_trusted: a file another user owns, that
others may write, or that is a link or not a plain file is not read. Written by atomic.write_atomic,
0600 in a 0700 folder. A file that cannot be trusted, read or matched (another key, a shape the model
does not have) costs one warning and a fresh quantisation, never a wrong weight; the fresh weights
replace it.
"""
from __future__ import annotations

import hashlib
import io
import json
import pathlib
import warnings

import numpy as np

from ... import trust
from ...atomic import write_atomic
from ...errors import UnsafeFileError

SUBDIR = "int8"


class QuantisedWeightsWarning(UserWarning):
    """Stored quantised weights could not be read or written; the weights are quantised afresh."""


class Store:
    """The quantised weights of one checkpoint for one layout, in `folder`."""

    def __init__(self, folder, key: dict):
        self.folder, self.key = pathlib.Path(folder), json.dumps(key, sort_keys=True)
        self.path = self.folder / f"{hashlib.sha256(self.key.encode()).hexdigest()[:32]}.npz"

    def load(self) -> list[np.ndarray] | None:
        """The stored arrays, in order; None where there is no usable file (with a warning where there is one)."""
        try:
            data = trust.read_trusted(self.path)
        except FileNotFoundError:
            return None
        except UnsafeFileError as e:
            return self._unusable(str(e))
        except OSError as e:
            return self._unusable(f"cannot read it ({e.strerror or e})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                key = str(arrays["key"])
                count = sum(1 for name in arrays.files if name != "key")
                weights = [arrays[f"w{i}"] for i in range(count)]
        except Exception as e:     # a damaged file of any kind: quantise again
            return self._unusable(f"not a readable weights file ({type(e).__name__}: {e})")
        if key != self.key or any(w.dtype != np.uint8 or w.ndim != 2 for w in weights):
            return self._unusable("it holds other weights than its name says")
        return weights

    def save(self, weights: list[np.ndarray]) -> pathlib.Path | None:
        """Store `weights`, replacing the file atomically; the file, or None where it could not be written
        (with a warning)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            arrays = {f"w{i}": w for i, w in enumerate(weights)}
            write_atomic(self.path, lambda f: np.savez(f, key=np.array(self.key), **arrays))
            return self.path
        except OSError as e:       # a full disk, a folder others may write (UnsafeFileError), ...
            warnings.warn(f"{self.path}: quantised weights not stored ({e.strerror or e}); they will be quantised "
                          "again at the next load", QuantisedWeightsWarning, stacklevel=3)
            return None

    def mismatch(self, why: str) -> None:
        """A stored file that does not fit the model being prepared: said once, then replaced."""
        self._unusable(why)

    def _unusable(self, why: str) -> None:
        warnings.warn(f"{self.path}: stored quantised weights not used: {why}; quantising again",
                      QuantisedWeightsWarning, stacklevel=4)
        return None
