"""The .npz embedding files `tinyclip embed` writes and `tinyclip search` reads.

Format 2 (the `format` array) holds:

    embeddings      (N, D) float32
    paths | texts   (N,) strings: image paths relative to `root` (absolute when outside it), or texts
    root            the folder `embed` ran in, absolute (image files only)
    model_identity  JSON of tinyclip.identity: hub_id, revision, folder, fingerprint
    dtype           the dtype the model ran in ("float32", "float16")
    normalized      whether the rows are unit length
    projection_dim  D

Format 1 (tinyclip 0.1's first files) recorded `model` as a folder path or hub id and no
fingerprint, so which weights made it cannot be checked; search refuses it unless told
--allow-other-model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from ..errors import UsageError

NPZ_FORMAT = 2


@dataclasses.dataclass
class ImageEmbeddings:
    embeddings: np.ndarray       # (N, D) float32
    paths: list[str]             # as the user can open them from here
    identity: dict | None        # None for format 1
    dtype: str | None
    old_model: str | None        # format 1's `model`


def stored_path(path: str, root: str) -> str:
    """`path` relative to `root` when it lies inside it, else absolute."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, root)
    return full if rel == ".." or rel.startswith(".." + os.sep) else rel


def shown_path(path: str, root: str) -> str:
    """A stored path as the user can open it from the current folder: relative to it when inside, else absolute."""
    full = os.path.normpath(os.path.join(root, path))
    return stored_path(full, os.getcwd())


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


def header(identity: dict, dtype: str, normalized: bool, dim: int) -> dict:
    """The arrays that describe the embeddings, for save()."""
    return dict(model_identity=np.array(json.dumps(identity)), dtype=np.array(dtype),
                normalized=np.array(bool(normalized)), projection_dim=np.array(dim, np.int64),
                format=np.array(NPZ_FORMAT, np.int64))


def read_image_embeddings(path: str, option: str = "--images") -> ImageEmbeddings:
    """The image embeddings of an .npz from `tinyclip embed`, checked for shape and format; errors name
    the file after `option`, the command-line option that gave it."""
    where = f"{option} {path}" if option else path
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise UsageError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "texts" in arrays and "paths" not in arrays:
        raise UsageError(f"{where}: holds text embeddings (made with --texts), not images")
    missing = [k for k in ("embeddings", "paths") if k not in arrays]
    if "model_identity" not in arrays and "model" not in arrays:
        missing.append("model_identity")
    if missing:
        raise UsageError(f"{where}: not written by `tinyclip embed` (no {', '.join(missing)} array)")
    embeddings, paths = arrays["embeddings"], arrays["paths"]
    if embeddings.ndim != 2 or paths.shape != (len(embeddings),):
        raise UsageError(f"{where}: embeddings {embeddings.shape} and paths {paths.shape} do not match")
    if "model_identity" not in arrays:     # format 1: paths relative to wherever embed ran
        return ImageEmbeddings(embeddings.astype(np.float32, copy=False), [str(p) for p in paths], None, None,
                               str(arrays["model"]))
    try:
        identity = json.loads(str(arrays["model_identity"]))
        root = str(arrays["root"])
        dtype = str(arrays["dtype"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"{where}: a damaged tinyclip embeddings file ({type(e).__name__}: {e}); "
                         "embed again") from None
    if not isinstance(identity, dict):
        raise UsageError(f"{where}: model_identity is not a JSON object; embed again")
    return ImageEmbeddings(embeddings.astype(np.float32, copy=False), [shown_path(str(p), root) for p in paths],
                           identity, dtype, None)
