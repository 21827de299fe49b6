"""Graph files on disk: where they live, how they are written, read, checked and pruned.

A file is a MAGIC line, a JSON header line (the key, tuned or not, the payload's size and sha256),
then the payload: the captured graph pickled without weights (tinyclip._tinygrad.graph_pickle).
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import stat
import sys
import time
import warnings

from .. import _tinygrad, trust
from ..cachedir import ENV_DIR, cache_root  # noqa: F401  (re-exported by graph_cache)
from ..atomic import write_atomic
from ..errors import UnsafeFileError
from .._tinygrad import graph_pickle
from . import key as keys

MAGIC = b"tinyclip-graph\n"
UNUSED_DAYS = 30                         # a graph not loaded for this long is deleted when another is saved


class GraphCacheWarning(UserWarning):
    """A cached graph could not be used or saved; tinyclip compiles afresh and goes on."""


def cache_dir() -> pathlib.Path:
    """The folder for graph files."""
    return cache_root() / "graphs"


class GraphStore:
    """The graph files of one loaded model on one backend.

    `graph` arguments are the runner's keys: ("image", batch) or ("text", batch, length).
    """

    def __init__(self, model, backend, folder: os.PathLike | None = None, tf32: bool = False):
        self.model, self.backend, self.tf32 = model, backend, tf32
        self.folder = pathlib.Path(folder) if folder is not None else cache_dir()
        self._warned: set[tuple[str, str]] = set()
        self._base_key: dict | None = None
        # Taken now, before any tower's weights are arranged for the kernel set (tinyclip/towers.py arranges
        # each on its first use): the same shapes in every process, whichever tower runs first.
        self._architecture = keys.architecture_hash(model)

    # ---- keys ------------------------------------------------------------------------------------

    def key(self, graph: tuple) -> dict:
        if self._base_key is None:
            self._base_key = keys.base_key(self.model, self.backend, self.tf32, self._architecture)
        return {**self._base_key, "graph": list(graph)}

    def account(self):
        """The padding account of this model's graphs (account.py), in the same folder, or None when the
        model's key cannot be computed."""
        from .account import Account
        try:
            return Account(self.folder / f"account-{keys.digest(self.key(('account',)))}.json")
        except Exception:
            return None

    def path(self, graph: tuple) -> pathlib.Path:
        return self.folder / f"{'-'.join(map(str, graph))}-{keys.digest(self.key(graph))}.graph"

    def has(self, graph: tuple) -> bool:
        """Whether a file for `graph` is there (not whether it will load: load() checks that)."""
        try:
            return self.path(graph).is_file()
        except Exception:    # a model or backend the key cannot describe: load() warns about it
            return False

    # ---- load --------------------------------------------------------------------------------------

    def load(self, graph: tuple):
        """A TinyJit that runs the cached graph for `graph`, or None (no file, or one that cannot be
        used: the reason is warned)."""
        try:
            path = self.path(graph)
        except Exception as e:    # a model or backend the key cannot describe: no cache, no crash
            self._warn(self.folder, f"no graph cache for this model ({type(e).__name__}: {e})")
            return None
        try:
            data = trust.read_trusted(path)
        except FileNotFoundError:
            return None
        except UnsafeFileError as e:
            self._warn(path, f"not using the cached graph {path}: {e}. tinyclip reads these files with "
                       "pickle, so it uses only plain files that you own and that only you can write. Fix the "
                       f"permissions (chmod go-w {path.parent} {path}) or delete the file; compiling afresh "
                       "for now, and leaving the file as it is.")
            return None
        except OSError as e:
            self._warn(path, f"cannot read the cached graph {path} ({e.strerror or e}); compiling afresh")
            return None
        try:
            header, captured = _decode(data, self.key(graph), self.model)
        except Exception as e:   # whatever is wrong with the file, recompute: never crash, never use it
            self.discard(graph, f"{type(e).__name__}: {e}")
            return None
        jit = _tinygrad.jit_from_captured(captured)
        jit.graph_header = header
        try:
            os.utime(path)      # its modification time says when it was last used: see _prune
        except OSError:
            pass
        return jit

    def discard(self, graph: tuple, reason: str) -> None:
        """Warn that the cached graph cannot be used, and delete it so that a fresh capture replaces it."""
        path = self.path(graph)
        reason = (reason.strip().splitlines() or ["?"])[0][:300]
        self._warn(path, f"the cached graph {path} cannot be used ({reason}); deleting it and compiling afresh")
        if not trust.untrusted(path.parent) and not trust.untrusted(path):
            try:
                path.unlink()
            except OSError:
                pass

    # ---- save --------------------------------------------------------------------------------------

    def save(self, graph: tuple, jit, *, tuned: bool = False, beam: int = 0) -> pathlib.Path | None:
        """Write `jit`'s captured graph for `graph`; returns the file, or None when not saved (warned,
        except when a tuned graph is already there and this one is not tuned)."""
        captured = _tinygrad.captured_graph(jit)
        if captured is None:
            return None
        path = self.folder
        try:
            path = self.path(graph)
            if not self._make_folder(path):
                return None
            if path.exists():
                if why := trust.untrusted(path):
                    self._warn(path, f"not saving the compiled graph to {path}: {why}; delete the file to let "
                               "tinyclip write its own")
                    return None
                if not tuned and (read_graph_header(path) or {}).get("tuned"):
                    return None     # a tuned graph stays until `tinyclip tune` replaces it
            payload = graph_pickle.dumps(captured, self.model)
            header = {"key": self.key(graph), "tuned": bool(tuned), "beam": int(beam),
                      "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            write_atomic(path, lambda f: f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
                                                 + payload))
            self._prune(path.parent)
            return path
        except Exception as e:   # a cache that cannot be written must not stop the embedding
            self._warn(path, f"could not save the compiled graph to {path} ({type(e).__name__}: {e}); "
                       "the next process will compile it again")
            return None

    def _prune(self, folder: pathlib.Path) -> None:
        """Delete graphs unused for UNUSED_DAYS (those of older tinyclip or tinygrad versions, of
        models no longer used), and temporary files a killed process left."""
        now = time.time()
        for f in folder.iterdir():
            try:
                age = now - f.lstat().st_mtime
                if (f.suffix == ".graph" and age > UNUSED_DAYS * 86400) or (f.suffix == ".tmp" and age > 86400):
                    if not trust.untrusted(f):
                        f.unlink()
            except OSError:
                pass

    def _make_folder(self, path: pathlib.Path) -> bool:
        folder = path.parent
        if not folder.is_dir():
            # tinyclip's own folders are private; a parent that exists (~/.cache) is left as it is
            for d in (folder.parent, folder):
                if not d.is_dir():
                    d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if why := trust.untrusted(folder):
            self._warn(folder, f"not saving compiled graphs in {folder}: {why}. Make it private "
                       f"(chmod 700 {folder}), or set {ENV_DIR} to a folder only you can write.")
            return False
        return True

    def _warn(self, path, message: str) -> None:
        if (str(path), message) not in self._warned:       # once per file and reason per process
            self._warned.add((str(path), message))
            warnings.warn(f"tinyclip: {message}", GraphCacheWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside tinyclip, so that a warning names the user's line."""
    package = str(keys.PACKAGE) + os.sep
    frame, level = sys._getframe(2), 2      # 1 is warnings.warn's caller (_warn)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def read_graph_header(path: os.PathLike) -> dict | None:
    """The JSON header of a graph file (key, tuned, beam, payload size and checksum), or None when the
    file is missing or not a graph file. Reads only the header: no pickle."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):     # a FIFO would block the open
            return None
        with open(path, "rb", opener=_no_follow) as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            return json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return None


def _no_follow(path, flags):
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))



def _decode(data: bytes, key: dict, model):
    if not data.startswith(MAGIC):
        raise ValueError("not a tinyclip graph file")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError("truncated header")
    header = json.loads(data[len(MAGIC):end])
    payload = data[end + 1:]
    if len(payload) != header["payload_bytes"] or hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"the file is damaged or truncated ({len(payload)} of {header['payload_bytes']} bytes, "
                         "checksum mismatch)")
    if keys.canonical(header["key"]) != keys.canonical(key):
        raise ValueError("it was made for another model, device or tinygrad version")
    return header, graph_pickle.loads(payload, model)
