"""A folder of image embeddings as Parquet shards, written a shard at a time and resumable.

Layout of an output folder (what `tinyclip embed SRC --out DIR --engine ray` writes)::

    DIR/manifest.json          model identity, dtype, projection_dim, normalized, tinyclip version, count
    DIR/part-<run>-<n>.parquet columns path, embedding, size, mtime, error

`path` is the absolute path of the image; `embedding` a fixed-size list of `projection_dim` float32
(null where the file could not be read); `size` and `mtime` (st_size, st_mtime_ns) the file as it
was embedded; `error` null, or why the file could not be read.

A shard is written under a hidden temporary name and renamed when complete, so a run killed
part-way leaves only whole shards, and only those count as done. A re-run skips every file whose
(path, size, mtime) a shard already holds, so each image ends up in the folder once; a file changed
since (other size or mtime) is embedded again and its newest row wins when the folder is read.
Only one run at a time may write to a folder.

pyarrow is imported on first use: `import tinyclip` does not need it.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
import uuid
from typing import Iterable, Iterator

import numpy as np

from . import __version__, identity
from .atomic import write_atomic
from .errors import TinyClipError

MANIFEST = "manifest.json"
FORMAT = 1                       # manifest["format"], for readers to check
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
TMP_PREFIX = ".tmp-"             # a shard or manifest being written; never read, removed by the next run
KEY_COLUMNS = ("path", "size", "mtime")


class OutputFolderError(TinyClipError, ValueError):
    """An output folder cannot be used: it holds other files, another model's or dtype's embeddings,
    or a damaged manifest or shard."""


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is not imported by `import pyarrow`)
    except ImportError:
        raise OutputFolderError("the Parquet output folder needs pyarrow: pip install 'tinyclip[ray]'") from None
    return pyarrow


def is_output_folder(folder) -> bool:
    """Whether `folder` is an embedding folder written by this module (it has a manifest)."""
    return (pathlib.Path(folder) / MANIFEST).is_file()


def file_key(path: str) -> tuple[str, int, int]:
    """(absolute path, size, mtime in ns) of a file: what a shard row is matched by. OSError if it cannot
    be read."""
    st = os.stat(path)
    return os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)


def manifest_for(model_identity: dict, dtype: str, projection_dim: int, normalized: bool) -> dict:
    """A manifest for a new folder (count 0, not complete)."""
    return {"format": FORMAT, "model": model_identity, "dtype": dtype, "projection_dim": int(projection_dim),
            "normalized": bool(normalized), "tinyclip_version": __version__, "count": 0, "errors": 0,
            "complete": False}


def read_manifest(folder) -> dict:
    folder = pathlib.Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OutputFolderError(f"{path}: cannot read the manifest ({e}); it was not written by tinyclip, or "
                                "is damaged: use another folder") from None
    missing = [k for k in ("format", "model", "dtype", "projection_dim", "normalized") if k not in manifest] \
        if isinstance(manifest, dict) else ["all"]
    if missing:
        raise OutputFolderError(f"{path}: not a tinyclip embedding manifest (no {', '.join(missing)})")
    if manifest["format"] != FORMAT:
        raise OutputFolderError(f"{path}: format {manifest['format']!r}, this tinyclip reads format {FORMAT}; "
                                f"use the tinyclip version that wrote it ({manifest.get('tinyclip_version')})")
    return manifest


def check_compatible(folder, stored: dict, wanted: dict) -> None:
    """Refuse to mix embeddings: `stored` (the folder's manifest) and `wanted` must agree on the model,
    dtype, projection_dim and normalized."""
    where = pathlib.Path(folder) / MANIFEST
    if not identity.same_model(stored["model"], wanted["model"]):
        raise OutputFolderError(
            f"{where}: the folder holds embeddings of {identity.describe(stored['model'])}, not of "
            f"{identity.describe(wanted['model'])}; write to another --out folder, or use that model")
    for key, option in (("dtype", "--dtype"), ("projection_dim", "--model"), ("normalized", "--normalize")):
        if stored[key] != wanted[key]:
            raise OutputFolderError(f"{where}: the folder holds embeddings with {key} {stored[key]!r}, this run "
                                    f"makes {wanted[key]!r}; write to another --out folder, or change {option}")


def shard_files(folder) -> list[pathlib.Path]:
    """The complete shards of `folder`, oldest first (shard names sort by run, then sequence)."""
    folder = pathlib.Path(folder)
    return sorted(p for p in folder.iterdir() if p.name.startswith(SHARD_PREFIX) and p.name.endswith(SHARD_SUFFIX))


def _read_table(path: pathlib.Path, columns):
    pa = _pyarrow()
    try:
        return pa.parquet.read_table(path, columns=list(columns))
    except Exception as e:     # pyarrow raises ArrowInvalid, OSError, KeyError ... for a damaged file
        raise OutputFolderError(f"{path}: cannot read the shard ({type(e).__name__}: {e}); delete it and run "
                                "again to re-embed its images") from None


class ShardWriter:
    """Writes embedded rows into an output folder as Parquet shards, skipping rows already there.

    ``ShardWriter(folder, manifest)`` creates the folder, or checks that the one there holds the same
    model, dtype and normalisation (OutputFolderError otherwise), and reads which (path, size, mtime)
    keys its shards already hold (`done`). `write` appends one shard, `finish` records the count.
    """

    def __init__(self, folder, manifest: dict):
        self.folder = pathlib.Path(folder)
        self.manifest = dict(manifest)
        self.dim = int(manifest["projection_dim"])
        if self.folder.is_dir() and is_output_folder(self.folder):
            stored = read_manifest(self.folder)
            check_compatible(self.folder, stored, self.manifest)
        elif self.folder.is_dir() and any(not p.name.startswith(".") for p in self.folder.iterdir()):
            raise OutputFolderError(f"{self.folder}: the folder is not empty and has no {MANIFEST}, so it was not "
                                    "written by tinyclip; give a new or empty folder")
        elif self.folder.exists() and not self.folder.is_dir():
            raise OutputFolderError(f"{self.folder}: exists and is not a folder; give a new or empty folder")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"{self.folder}: cannot create the folder ({e.strerror or e})") from None
        for stale in self.folder.glob(TMP_PREFIX + "*"):     # left by a run that was killed
            stale.unlink(missing_ok=True)
        self.done: set[tuple[str, int, int]] = set()
        self.rows = self.errors = 0
        for shard in shard_files(self.folder):
            table = _read_table(shard, KEY_COLUMNS + ("error",))
            keys = zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS))
            self.done.update(keys)
            self.errors += table.num_rows - table.column("error").null_count
        self.rows = len(self.done)
        # Names sort by start time (to the ns), so the newest run's rows win in read_embeddings; the
        # random part keeps two writers started in the same ns from ever overwriting each other.
        now = time.time_ns()
        self.run = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}-"
                    + uuid.uuid4().hex[:8])
        self.seq = 0
        self._write_manifest(complete=False)

    def write(self, paths, sizes, mtimes, embeddings: np.ndarray, errors) -> int:
        """Append the rows not yet in the folder as one shard; returns how many were new.

        `embeddings` is (n, projection_dim) float32, its rows ignored where `errors[i]` is not None.
        """
        pa = _pyarrow()
        keep = []
        for i, key in enumerate(zip(paths, (int(s) for s in sizes), (int(m) for m in mtimes))):
            if key not in self.done:
                self.done.add(key)
                keep.append(i)
        if not keep:
            return 0
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.shape != (len(paths), self.dim):
            raise OutputFolderError(f"{self.folder}: rows of shape {embeddings.shape}, the folder holds "
                                    f"{self.dim}-dimensional embeddings")
        errors = [None if errors[i] is None else str(errors[i]) for i in keep]
        valid = np.array([e is None for e in errors])
        flat = pa.array(embeddings[keep].reshape(-1), pa.float32())
        vectors = pa.FixedSizeListArray.from_arrays(flat, self.dim, mask=pa.array(~valid))
        table = pa.table({"path": pa.array([paths[i] for i in keep], pa.string()),
                          "embedding": vectors,
                          "size": pa.array([int(sizes[i]) for i in keep], pa.int64()),
                          "mtime": pa.array([int(mtimes[i]) for i in keep], pa.int64()),
                          "error": pa.array(errors, pa.string())})
        name = f"{SHARD_PREFIX}{self.run}-{self.seq:06d}{SHARD_SUFFIX}"
        self.seq += 1
        try:
            write_atomic(self.folder / name, lambda f: pa.parquet.write_table(table, f), private=False,
                         tmp_prefix=TMP_PREFIX)
        except OSError as e:
            raise OutputFolderError(f"{self.folder / name}: cannot write the shard ({e.strerror or e})") from None
        self.rows += len(keep)
        self.errors += int((~valid).sum())
        return len(keep)

    def finish(self) -> dict:
        """Record the count in the manifest and mark the folder complete; returns the manifest."""
        self._write_manifest(complete=True)
        return self.manifest

    def _write_manifest(self, complete: bool) -> None:
        self.manifest.update(count=self.rows - self.errors, errors=self.errors, complete=complete,
                             tinyclip_version=__version__)
        write_json(self.folder / MANIFEST, self.manifest)


def write_json(path: pathlib.Path, value) -> None:
    """Write JSON to a temporary name beside `path`, then rename: a crash never leaves half a file."""
    try:
        write_atomic(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()), private=False,
                     tmp_prefix=TMP_PREFIX)
    except OSError as e:
        raise OutputFolderError(f"{path}: cannot write it ({e.strerror or e})") from None


def iter_rows(folder, columns: Iterable[str] = ("path", "embedding", "size", "mtime", "error")) -> Iterator[dict]:
    """Every row of every shard as a dict of Python values (the embedding as a list), oldest first."""
    for shard in shard_files(folder):
        yield from _read_table(shard, columns).to_pylist()


def read_embeddings(folder) -> tuple[np.ndarray, np.ndarray, dict]:
    """The embeddings of an output folder, for search: (embeddings (N, D) float32, paths (N,), manifest).

    Rows with an error are left out; where a path was embedded more than once (the file changed
    between runs), its newest row wins.
    """
    pa = _pyarrow()
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder)
    dim = int(manifest["projection_dim"])
    latest: dict[str, tuple[int, int]] = {}      # path -> (table index, row)
    tables = []
    for shard in shard_files(folder):
        table = _read_table(shard, ("path", "embedding", "error"))
        if table.schema.field("embedding").type != pa.list_(pa.float32(), dim):
            raise OutputFolderError(f"{shard}: embedding column is {table.schema.field('embedding').type}, the "
                                    f"manifest says {dim} float32; the shard is not from this folder")
        ok = table.column("error").is_null().to_numpy(zero_copy_only=False)
        for row, (path, good) in enumerate(zip(table.column("path").to_pylist(), ok)):
            if good:
                latest[path] = (len(tables), row)
            else:
                latest.pop(path, None)
        tables.append(table)
    paths = np.array(list(latest), dtype=str)
    out = np.empty((len(latest), dim), np.float32)
    by_table: dict[int, tuple[list[int], list[int]]] = {}     # table -> (output rows, table rows)
    for i, (t, row) in enumerate(latest.values()):
        dest, src = by_table.setdefault(t, ([], []))
        dest.append(i)
        src.append(row)
    for t, (dest, src) in by_table.items():
        vectors = tables[t].column("embedding").combine_chunks()
        # .values is the child array with null lists' slots still in place (flatten() would drop them)
        values = vectors.values.slice(vectors.offset * dim, len(vectors) * dim).to_numpy(zero_copy_only=False)
        out[np.array(dest)] = values.reshape(-1, dim)[np.array(src)]
    return out, paths, manifest


def read_for_search(folder, model, revision: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, paths) of an output folder, refused (OutputFolderError) unless `model` (a hub id or
    folder, as `tinyclip.load` takes) is the checkpoint that made them."""
    from . import hub
    embeddings, paths, manifest = read_embeddings(folder)
    checkpoint = hub.locate(model, revision=revision)
    hub_id = None if pathlib.Path(model).expanduser().is_dir() else str(model)
    current = identity.of_checkpoint(checkpoint, hub_id, revision)
    if not identity.same_model(manifest["model"], current):
        raise OutputFolderError(f"--images {folder}: embedded with {identity.describe(manifest['model'])}, not "
                                f"{identity.describe(current)}; search with that --model, or embed again")
    return embeddings, paths
