"""A folder of image embeddings as Parquet shards, written a shard at a time and resumable.

Layout of an output folder (what `tinyclip embed SRC --out DIR --engine ray` writes)::

    DIR/manifest.json          format, model identity, dtype, projection_dim, normalized, tinyclip version, count
    DIR/part-<run>-<n>.parquet columns path, embedding, size, mtime, error
    DIR/.lock                  while a run writes: the pid and host of that run

`path` is the absolute path of the image as bytes: the file name exactly as the file system holds it
(`os.fsencode`), so any name, UTF-8 or not, is kept; `os.fsdecode` gives the `str` that Python's
`open` takes. (Format 1 folders, from earlier tinyclip versions, stored it as a UTF-8 string; they
are still read, and a run that appends to one makes it format 2.) `embedding` is a fixed-size list of
`projection_dim` float32 (null where the file could not be read); `size` and `mtime` (st_size,
st_mtime_ns) the file as it was embedded; `error` null, or why the file could not be read. Shards
are written with Parquet page checksums (CRC32), and every read verifies them: a damaged shard is
refused by readers and, on the next run, set aside (renamed `.damaged-<name>`) and its images embedded
again.

A shard is written under a hidden temporary name and renamed when complete, so a run killed
part-way leaves only whole shards, and only those count as done. A re-run skips every file whose
(path, size, mtime) a shard already holds with an embedding; files that could not be read are tried
again (unless asked not to), and a file changed since (other size or mtime) is embedded again. The
newest row of a path is the one that counts when the folder is read. One run at a time writes to a
folder: it holds the lock file, and another run is refused with the pid and host that hold it.

pyarrow is imported on first use: `import tinyclip` does not need it.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import time
import uuid
import warnings
from typing import Iterable, Iterator

import numpy as np

from . import __version__, identity
from .atomic import write_atomic
from .errors import TinyClipError

MANIFEST = "manifest.json"
FORMAT = 2                       # manifest["format"]: 2 = paths as bytes and page checksums
READABLE_FORMATS = (1, 2)        # 1: paths as UTF-8 strings, no checksums
DTYPES = ("float32", "float16", "bfloat16", "int8")
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
TMP_PREFIX = ".tmp-"             # a shard or manifest being written; never read, removed by the next run
DAMAGED_PREFIX = ".damaged-"     # a shard that failed its checksums, kept for inspection and never read
LOCK = ".lock"
KEY_COLUMNS = ("path", "size", "mtime")
COLUMNS = ("path", "embedding", "size", "mtime", "error")


class OutputFolderError(TinyClipError, ValueError):
    """An output folder cannot be used: it holds other files, another model's or dtype's embeddings,
    a damaged manifest or shard, or another run is writing to it."""


class DamagedShardWarning(UserWarning):
    """A shard failed its checksums or could not be parsed; it is set aside and its images embedded again."""


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule is not imported by `import pyarrow`)
    except ImportError:
        raise OutputFolderError("the Parquet output folder needs pyarrow: pip install 'tinyclip[ray]'") from None
    return pyarrow


def shown(path) -> str:
    """A path for a message: bytes that are not UTF-8 as \\xNN escapes, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def is_output_folder(folder) -> bool:
    """Whether `folder` is an embedding folder written by this module (it has a manifest)."""
    return (pathlib.Path(folder) / MANIFEST).is_file()


def file_key(path) -> tuple[bytes, int, int]:
    """(absolute path as bytes, size, mtime in ns) of a file: what a shard row is matched by. OSError if
    it cannot be read."""
    st = os.stat(path)
    return os.fsencode(os.path.abspath(path)), int(st.st_size), int(st.st_mtime_ns)


def manifest_for(model_identity: dict, dtype: str, projection_dim: int, normalized: bool) -> dict:
    """A manifest for a new folder (count 0, not complete)."""
    return {"format": FORMAT, "model": model_identity, "dtype": dtype, "projection_dim": int(projection_dim),
            "normalized": bool(normalized), "tinyclip_version": __version__, "count": 0, "errors": 0,
            "complete": False}


def read_manifest(folder) -> dict:
    """The folder's manifest, checked field by field (OutputFolderError naming the field otherwise)."""
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
    if manifest["format"] not in READABLE_FORMATS:
        raise OutputFolderError(f"{path}: format {manifest['format']!r}, this tinyclip reads formats "
                                f"{', '.join(map(str, READABLE_FORMATS))}; use the tinyclip version that wrote it "
                                f"({manifest.get('tinyclip_version')})")
    model = manifest["model"]
    bad = ("model", "an object with a fingerprint") if not (isinstance(model, dict) and isinstance(
        model.get("fingerprint"), str)) else \
        ("dtype", f"one of {', '.join(DTYPES)}") if manifest["dtype"] not in DTYPES else \
        ("projection_dim", "a positive integer") if not (type(manifest["projection_dim"]) is int
                                                        and manifest["projection_dim"] > 0) else \
        ("normalized", "true or false") if not isinstance(manifest["normalized"], bool) else None
    if bad:
        raise OutputFolderError(f"{path}: {bad[0]} is {json.dumps(manifest[bad[0]])[:80]}, not {bad[1]}; the "
                                "manifest is damaged: embed into another folder")
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


class _Damaged(Exception):
    """A shard that fails its checksums or cannot be parsed (as opposed to one that cannot be opened)."""


def _read_table(path: pathlib.Path, columns):
    """The shard's `columns`, page checksums verified, with `path` as binary (format 1 held strings)."""
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(path, columns=list(columns), page_checksum_verification=True)
    except PermissionError as e:
        raise OutputFolderError(f"{path}: cannot read the shard ({e.strerror or e})") from None
    except Exception as e:     # pyarrow raises OSError (checksums), ArrowInvalid, KeyError ... for a damaged file
        raise _Damaged(f"{type(e).__name__}: {e}") from None
    if "path" in table.column_names and not pa.types.is_binary(table.schema.field("path").type):
        if not pa.types.is_string(table.schema.field("path").type):
            raise _Damaged(f"its path column is {table.schema.field('path').type}, not binary")
        paths = pa.array([None if p is None else os.fsencode(p) for p in table.column("path").to_pylist()],
                         pa.binary())
        table = table.set_column(table.column_names.index("path"), "path", paths)
    return table


def _read_checked(path: pathlib.Path, columns):
    """`_read_table` for readers: a damaged shard is an OutputFolderError that says how to redo it."""
    try:
        return _read_table(path, columns)
    except _Damaged as e:
        raise OutputFolderError(f"{path}: the shard is damaged ({e}); run the same embed command again: it sets "
                                "the shard aside and embeds its images again") from None


class FolderLock:
    """The lock file of an output folder: created with O_EXCL, holding the owner's pid, host and start.

    A lock left by a run that died (its pid is gone, or is another process now, on this host) is taken
    over; one held by a live run, or by a run on another host (which cannot be checked from here), is
    refused with one line naming both.
    """

    def __init__(self, folder: pathlib.Path):
        self.path = folder / LOCK
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()),
                   "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> None:
        for _ in range(100):      # each round either takes the lock, refuses, or removes a dead owner's
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or not self._dead(owner):
                    raise OutputFolderError(self._busy(owner)) from None
                self._break(owner)
                continue
            except OSError as e:
                raise OutputFolderError(f"{self.path}: cannot create the lock file ({e.strerror or e})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.me, f)
            self.held = True
            return
        raise OutputFolderError(self._busy(self._owner()))

    def release(self) -> None:
        if self.held:
            if self._owner() == self.me:
                self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> dict | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, encoding="utf-8") as f:
                owner = json.loads(f.read(4096))
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _dead(self, owner: dict) -> bool:
        """Whether the owner is certainly gone: same host, and its pid is not running or is a newer process."""
        if owner.get("host") != self.me["host"] or not isinstance(owner.get("pid"), int):
            return False
        started = _process_start(owner["pid"])
        return started is None or (owner.get("started") is not None and started != owner.get("started"))

    def _break(self, owner: dict) -> None:
        """Remove a dead owner's lock, making sure it is that lock being removed: renamed away first, then
        compared, and put back if another run took the folder in between."""
        aside = self.path.with_name(f"{LOCK}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = FolderLock(self.path.parent)
        moved.path = aside
        if moved._owner() != owner:
            try:
                os.link(aside, self.path)
            except OSError:
                pass
        aside.unlink(missing_ok=True)

    def _busy(self, owner: dict | None) -> str:
        if owner is None:
            return (f"{self.path.parent}: another run is writing to this folder (its lock file {LOCK} cannot be "
                    f"read); wait for it, or delete {self.path} if no run is writing there")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) \
            if isinstance(owner.get("started"), (int, float)) else "?"
        return (f"{self.path.parent}: another run is writing to this folder: pid {owner.get('pid')} on host "
                f"{owner.get('host')} (since {since}); wait for it, or delete {self.path} if that run is gone")


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is no such process. Two
    processes that share a pid at different times differ in this, so a reused pid is not mistaken for
    the lock's owner. Without /proc, only whether the pid exists (a fixed 0.0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return round(boot + ticks / os.sysconf("SC_CLK_TCK"), 2)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
        return 0.0


class ShardWriter:
    """Writes embedded rows into an output folder as Parquet shards, skipping rows already there.

    ``ShardWriter(folder, manifest)`` takes the folder's lock (OutputFolderError if another run holds
    it), creates the folder or checks that the one there holds the same model, dtype and
    normalisation, and reads which (path, size, mtime) keys its shards hold. `is_done(key)` says
    whether a file needs no embedding (with `retry_errors`, rows that failed are not done); `write`
    appends one shard; `finish` records the counts, marks the folder complete and releases the lock;
    `close` releases it without (use the writer as a context manager). Nothing is written before the
    first `write` or `finish`: a run that fails before leaves a folder it created behind as it was.
    """

    def __init__(self, folder, manifest: dict, retry_errors: bool = True):
        self.folder = pathlib.Path(folder)
        self.manifest = dict(manifest)
        self.dim = int(manifest["projection_dim"])
        self.retry_errors = retry_errors
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputFolderError(f"{self.folder}: exists and is not a folder; give a new or empty folder")
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"{self.folder}: cannot create the folder ({e.strerror or e})") from None
        self.lock = FolderLock(self.folder)
        self.lock.acquire()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        if is_output_folder(self.folder):
            check_compatible(self.folder, read_manifest(self.folder), self.manifest)
        elif any(not p.name.startswith(".") for p in self.folder.iterdir()):
            raise OutputFolderError(f"{self.folder}: the folder is not empty and has no {MANIFEST}, so it was not "
                                    "written by tinyclip; give a new or empty folder")
        for stale in self.folder.glob(TMP_PREFIX + "*"):     # left by a run that was killed
            stale.unlink(missing_ok=True)
        # path -> (size, mtime, embedded, written by this run), from each path's newest row
        self.latest: dict[bytes, tuple[int, int, bool, bool]] = {}
        self.count = self.errors = 0
        self.damaged: list[pathlib.Path] = []
        for shard in shard_files(self.folder):
            try:        # every column, so that each page's checksum is verified, not only the keys'
                table = _read_table(shard, COLUMNS)
            except _Damaged as e:
                aside = shard.with_name(DAMAGED_PREFIX + shard.name)
                os.replace(shard, aside)
                self.damaged.append(aside)
                warnings.warn(DamagedShardWarning(f"{shard}: damaged ({e}); set aside as {aside.name}, its images "
                                                  "are embedded again"), stacklevel=2)
                continue
            ok = table.column("error").is_null().to_pylist()
            keys = zip(*(table.column(c).to_pylist() for c in KEY_COLUMNS))
            for (path, size, mtime), good in zip(keys, ok):
                self._record(path, size, mtime, good, False)
        self.manifest_written = False
        # Names sort by start time (to the ns), so the newest run's rows win in read_embeddings; the
        # random part keeps two writers started in the same ns from ever overwriting each other.
        now = time.time_ns()
        self.run = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f".{now % 10**9:09d}-"
                    + uuid.uuid4().hex[:8])
        self.seq = 0

    def _record(self, path: bytes, size: int, mtime: int, good: bool, this_run: bool) -> None:
        old = self.latest.get(path)
        if old is not None:
            self.count -= old[2]
            self.errors -= not old[2]
        self.latest[path] = (size, mtime, good, this_run)
        self.count += good
        self.errors += not good

    @property
    def rows(self) -> int:
        """Files in the folder (their newest rows), embedded or not."""
        return len(self.latest)

    def is_done(self, key: tuple[bytes, int, int]) -> bool:
        """Whether the file with this (path, size, mtime) needs no embedding in this run."""
        row = self.latest.get(key[0])
        if row is None or row[:2] != (key[1], key[2]):
            return False
        return row[2] or row[3] or not self.retry_errors

    def write(self, paths, sizes, mtimes, embeddings: np.ndarray, errors) -> int:
        """Append the rows not yet done as one shard; returns how many were new.

        `paths` are bytes (`file_key`'s) or str; `embeddings` is (n, projection_dim) float32, its rows
        ignored where `errors[i]` is not None.
        """
        pa = _pyarrow()
        paths = [os.fsencode(p) for p in paths]
        keep = []
        for i, key in enumerate(zip(paths, (int(s) for s in sizes), (int(m) for m in mtimes))):
            if not self.is_done(key):
                self._record(*key, errors[i] is None, True)
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
        table = pa.table({"path": pa.array([paths[i] for i in keep], pa.binary()),
                          "embedding": vectors,
                          "size": pa.array([int(sizes[i]) for i in keep], pa.int64()),
                          "mtime": pa.array([int(mtimes[i]) for i in keep], pa.int64()),
                          "error": pa.array(errors, pa.string())})
        if not self.manifest_written:
            self._write_manifest(complete=False)
        name = f"{SHARD_PREFIX}{self.run}-{self.seq:06d}{SHARD_SUFFIX}"
        self.seq += 1
        try:
            write_atomic(self.folder / name, lambda f: pa.parquet.write_table(table, f, **WRITE_OPTIONS),
                         private=False, tmp_prefix=TMP_PREFIX)
        except OSError as e:
            raise OutputFolderError(f"{self.folder / name}: cannot write the shard ({e.strerror or e})") from None
        return len(keep)

    def finish(self) -> dict:
        """Record the count in the manifest, mark the folder complete and release the lock; returns the manifest."""
        try:
            self._write_manifest(complete=True)
        finally:
            self.close()
        return self.manifest

    def close(self) -> None:
        """Release the lock; a folder this writer created and never wrote to is removed again."""
        if self.created and not getattr(self, "manifest_written", False):
            self.lock.release()
            try:
                self.folder.rmdir()
            except OSError:
                pass
        self.lock.release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_manifest(self, complete: bool) -> None:
        self.manifest.update(format=FORMAT, count=self.count, errors=self.errors, complete=complete,
                             tinyclip_version=__version__)
        write_json(self.folder / MANIFEST, self.manifest)
        self.manifest_written = True


# Page checksums (CRC32 of each page) let every read tell a damaged shard from a good one. Dictionary
# encoding is for the repeated strings only: embeddings are random floats, paths are unique.
WRITE_OPTIONS = dict(write_page_checksum=True, use_dictionary=["error"])


def write_json(path: pathlib.Path, value) -> None:
    """Write JSON to a temporary name beside `path`, then rename: a crash never leaves half a file."""
    try:
        write_atomic(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()), private=False,
                     tmp_prefix=TMP_PREFIX)
    except OSError as e:
        raise OutputFolderError(f"{path}: cannot write it ({e.strerror or e})") from None


def iter_rows(folder, columns: Iterable[str] = COLUMNS) -> Iterator[dict]:
    """Every row of every shard as a dict of Python values (`path` as bytes, the embedding as a list),
    oldest first; a path written again later (retried, or changed) appears again, its newest row counting."""
    for shard in shard_files(folder):
        yield from _read_checked(shard, columns).to_pylist()


def read_embeddings(folder) -> tuple[np.ndarray, np.ndarray, dict]:
    """The embeddings of an output folder, for search: (embeddings (N, D) float32, paths (N,) str, manifest).

    Paths are `os.fsdecode`d (a name that is not UTF-8 keeps its bytes as surrogate escapes, as
    `os.listdir` gives it). Rows with an error are left out; where a path was embedded more than once
    (the file changed between runs, or failed and was retried), its newest row wins.
    """
    pa = _pyarrow()
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder)
    dim = int(manifest["projection_dim"])
    latest: dict[bytes, tuple[int, int]] = {}      # path -> (table index, row)
    tables = []
    for shard in shard_files(folder):
        table = _read_checked(shard, ("path", "embedding", "error"))
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
    paths = np.array([os.fsdecode(p) for p in latest], dtype=str)
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
