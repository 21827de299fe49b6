"""Ensembled label embeddings kept on disk, so that a label set is encoded once per model.

Encoding ImageNet's 1,000 labels with the 80 prompt templates is 80,000 texts (minutes on a
CPU); `tinyclip classify` with the same labels later reads them back in milliseconds. One file
per (model fingerprint, dtype, templates) holds the labels seen so far:

    $TINYCLIP_CACHE_DIR/labels/<sha256 of the key>.npz    (default: ~/.cache/tinyclip/labels)

with arrays `key` (the key as JSON, checked on reading), `labels` (L,) and `embeddings` (L, D)
float32, unit rows, and `longest` (L,) the tokens in each label's longest prompt, so that a label
the context cuts warns when it is read back too (-1 where unknown; files without it are read, and
their lengths counted again). Files are numpy arrays read with allow_pickle=False, private to the user
(0600 in a 0700 folder), written to a temporary file and renamed, and not read when another user
owns them or others may write them. A file that cannot be read or written costs a warning and a
re-encode, never a wrong answer: the stored key must match the one asked for.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import warnings

import numpy as np

from . import trust
from .atomic import write_atomic
from .errors import UnsafeFileError

FORMAT = 1     # part of the key: a new layout never reads an old file
SUBDIR = "labels"


class LabelStoreWarning(UserWarning):
    """A stored label-embedding file could not be read or written; the labels are encoded afresh."""


def default() -> "LabelStore | None":
    """The store under tinyclip's cache folder, or None when the caches are switched off
    (TINYCLIP_GRAPH_CACHE=0 switches off everything tinyclip keeps on disk)."""
    from . import graph_cache
    if not graph_cache.enabled():
        return None
    return LabelStore(graph_cache.cache_root() / SUBDIR)


class LabelStore:
    """Label embeddings on disk in `folder`, one file per (fingerprint, dtype, templates)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)

    def path(self, key: tuple) -> pathlib.Path:
        return self.folder / f"{hashlib.sha256(_key_json(key).encode()).hexdigest()[:32]}.npz"

    def load(self, key: tuple, dim: int | None = None) -> dict[str, np.ndarray]:
        """{label: embedding (D,) float32} stored under `key` = (fingerprint, dtype, templates);
        empty when there is no file, or it cannot be trusted or read, or its rows are not `dim` wide
        (with a warning)."""
        return self.load_with_lengths(key, dim)[0]

    def load_with_lengths(self, key: tuple, dim: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(load(key, dim), {label: tokens in its longest prompt}) where the file records the lengths
        (files written before they were stored have none: the caller counts them)."""
        path = self.path(key)
        try:
            data = trust.read_trusted(path)
        except FileNotFoundError:
            return {}, {}
        except UnsafeFileError as e:
            return _unusable(path, str(e))
        except OSError as e:
            return _unusable(path, f"cannot read it ({e.strerror or e})")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                stored_key, labels, embeds = str(arrays["key"]), arrays["labels"], arrays["embeddings"]
                longest = arrays["longest"] if "longest" in arrays.files else np.full(len(labels), -1)
        except Exception as e:     # a damaged file of any kind: encode again
            return _unusable(path, f"not a readable label file ({type(e).__name__}: {e})")
        if stored_key != _key_json(key) or embeds.ndim != 2 or labels.shape != (len(embeds),) \
                or embeds.dtype != np.float32 or longest.shape != labels.shape or longest.dtype.kind not in "iu":
            return _unusable(path, "it holds other labels' data than its name says")
        if dim is not None and embeds.shape[1] != dim:
            return _unusable(path, f"its embeddings are {embeds.shape[1]} wide, this model's are {dim}")
        return ({str(label): e for label, e in zip(labels, embeds)},
                {str(label): int(n) for label, n in zip(labels, longest) if n >= 0})

    def save(self, key: tuple, entries: dict[str, np.ndarray], longest: dict[str, int] | None = None) \
            -> pathlib.Path | None:
        """Store `entries` ({label: embedding}) under `key`, with `longest` ({label: tokens in its longest
        prompt}, -1 where unknown), replacing the file atomically. Returns the file, or None when it
        could not be written (with a warning)."""
        longest = longest or {}
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(path, lambda f: np.savez(
                f, key=np.array(_key_json(key)), labels=np.array(list(entries), dtype=str),
                embeddings=np.stack(list(entries.values())).astype(np.float32),
                longest=np.array([longest.get(label, -1) for label in entries], np.int64)))
            return path
        except OSError as e:       # a full disk, a folder others may write (UnsafeFileError), ...
            warnings.warn(f"{path}: label embeddings not stored ({e.strerror or e}); they will be encoded "
                          "again next time", LabelStoreWarning, stacklevel=2)
            return None


def _key_json(key: tuple) -> str:
    fingerprint, dtype, templates = key
    return json.dumps({"format": FORMAT, "fingerprint": fingerprint, "dtype": dtype, "templates": list(templates)})


def _unusable(path, why: str) -> tuple[dict, dict]:
    warnings.warn(f"{path}: stored label embeddings not used: {why}; encoding the labels again",
                  LabelStoreWarning, stacklevel=3)
    return {}, {}
