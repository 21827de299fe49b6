"""The .npz embedding files `tinyclip embed` writes and `tinyclip search` reads."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from ..errors import UsageError

NPZ_FORMAT = 1    # stored as `format` in embed's .npz, for readers to check


def model_identity(name) -> str:
    """What an .npz records as its model: a local folder's absolute path, else the hub id as given."""
    path = pathlib.Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def save(out: pathlib.Path, **arrays) -> None:
    """Write `arrays` to `out` (np.savez) without ever leaving a truncated file there."""
    # written next to the target and renamed, so an interrupted run never leaves a truncated .npz
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the file ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def read_image_embeddings(path: str, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, D) float32, paths (N,)) of an image .npz from `tinyclip embed`, checked
    to come from `model_name`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise UsageError(f"--images {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "texts" in arrays and "paths" not in arrays:
        raise UsageError(f"--images {path}: holds text embeddings (made with --texts), not images")
    missing = [k for k in ("embeddings", "paths", "model") if k not in arrays]
    if missing:
        raise UsageError(f"--images {path}: not written by `tinyclip embed` (no {', '.join(missing)} array)")
    embeddings, paths = arrays["embeddings"], arrays["paths"]
    if embeddings.ndim != 2 or paths.shape != (len(embeddings),):
        raise UsageError(f"--images {path}: embeddings {embeddings.shape} and paths {paths.shape} do not match")
    stored, current = str(arrays["model"]), model_identity(model_name)
    if stored != current:
        raise UsageError(f"--images {path}: embedded with model {stored}, not {current}; search with "
                         f"--model {stored}, or embed again with this model")
    return embeddings.astype(np.float32, copy=False), paths
