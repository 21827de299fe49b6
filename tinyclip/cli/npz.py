"""The .npz embedding files `tinyclip embed` writes and `tinyclip search` reads.

Format 3 (the `format` array) holds:

    embeddings      (N, D) float32
    paths | texts   (N,) strings: image paths relative to the .npz's own folder where they lie under
                    it (so the folder and its .npz can move together), absolute elsewhere; or texts
    root            the .npz's folder when it was written, absolute (image files only; for reference)
    model_identity  JSON of tinyclip.identity: hub_id, revision, folder, fingerprint
    dtype           the dtype the model ran in ("float32", "float16", "bfloat16", "int8")
    normalized      whether the rows are unit length
    projection_dim  D

Format 2 stored image paths relative to `root`, the folder `embed` ran in; such files are read as
they were. Format 1 (tinyclip 0.1's first files) recorded `model` as a folder path or hub id and no
fingerprint, so which weights made it cannot be checked; search refuses it unless told
--allow-other-model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import numpy as np

from ..atomic import write_atomic
from ..errors import UsageError

NPZ_FORMAT = 3


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


def missing(paths: list[str]) -> list[str]:
    """The stored paths (as read_image_embeddings shows them) whose files are gone."""
    return [p for p in paths if not os.path.exists(p)]


def shown_path(path: str, root: str) -> str:
    """A stored path as the user can open it from the current folder: relative to it when inside, else absolute."""
    full = os.path.normpath(os.path.join(root, path))
    return stored_path(full, os.getcwd())


def check_out(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse an --out that cannot be written, before any work: not an .npz name, a folder, a missing
    folder, an existing file without --overwrite, or a folder this process cannot create files in
    (tried with a file created and removed at once: permissions, a read-only file system)."""
    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {out}: the file name must end in .npz")
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give the name of an .npz file to write")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"--out {out}: the folder {folder} does not exist")
    if out.exists() and not overwrite:
        raise UsageError(f"--out {out}: the file exists; pass --overwrite to replace it, or another name")
    probe = folder / f".{out.name}.{os.getpid()}.probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create files in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def save(out: pathlib.Path, **arrays) -> None:
    """Write `arrays` to `out` (np.savez) without ever leaving a truncated file there, and without
    following a link planted at a temporary name in a shared folder (tinyclip.atomic)."""
    try:
        write_atomic(out, lambda f: np.savez(f, **arrays), private=False)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the file ({e.strerror or e})") from None


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
    if embeddings.dtype.kind not in "fiu":
        raise UsageError(f"{where}: its embeddings are {embeddings.dtype} values, not numbers; embed again")
    embeddings = embeddings.astype(np.float32, copy=False)
    if len(bad := np.flatnonzero(~np.isfinite(embeddings).all(axis=1))):
        more = f" (and {len(bad) - 1} other rows)" if len(bad) > 1 else ""
        raise UsageError(f"{where}: row {bad[0]} ({paths[bad[0]]}) holds NaN or infinity{more}; "
                         "embed that image again")
    if "model_identity" not in arrays:     # format 1: paths relative to wherever embed ran
        return ImageEmbeddings(embeddings, [str(p) for p in paths], None, None,
                               str(arrays["model"]))
    try:
        identity = json.loads(str(arrays["model_identity"]))
        # format 3: relative to the .npz's folder, wherever it is now; format 2: to the folder embed ran in
        root = os.path.dirname(os.path.abspath(path)) if int(arrays.get("format", 2)) >= 3 else str(arrays["root"])
        dtype = str(arrays["dtype"])
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{where}: a damaged tinyclip embeddings file ({type(e).__name__}: {e}); "
                         "embed again") from None
    if not isinstance(identity, dict):
        raise UsageError(f"{where}: model_identity is not a JSON object; embed again")
    return ImageEmbeddings(embeddings, [shown_path(str(p), root) for p in paths],
                           identity, dtype, None)
