"""Backend probe answers remembered between processes, keyed by what decides them.

Choosing the default backend asks each registered backend, best first, whether it runs here. Some
answers cost a process hundreds of milliseconds (tinygrad's NV device imports its driver bindings
before it finds no GPU; OpenCL must open the driver to say whether its device is a GPU), and they
change only when what decides them changes: a driver installed, a library updated, an environment
variable set. A backend that can name those things (Backend.probe_key: file paths with their sizes
and times, environment variables) has its answers kept in `$TINYCLIP_CACHE_DIR/backends.json`
under a digest of that key, tinyclip's and tinygrad's versions and the backend's class; any change
to them is another digest, so the backend is asked again.

Only answers that let a process skip a backend are kept: "unavailable, because ..." and facts such
as an OpenCL device's kind. "Available" is always found out afresh, by opening the device that the
model is about to use anyway. The file is JSON, read only when it and its folder are yours alone
(tinyclip/trust.py), and rewritten atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import threading

from . import trust
from .atomic import write_atomic

FILE = "backends.json"
FORMAT = 1
_lock = threading.Lock()
_memory: dict[str, dict] | None = None     # the file's entries, read once per process


def _path() -> pathlib.Path:
    from .graph_cache import cache_root
    return cache_root() / FILE


def digest(backend, key: str) -> str:
    """The entry name of `backend`'s answers under its probe key."""
    from importlib.metadata import PackageNotFoundError, version
    from . import __version__
    try:
        tinygrad = version("tinygrad")
    except PackageNotFoundError:
        tinygrad = "?"
    cls = type(backend)
    text = "\0".join((backend.name, f"{cls.__module__}.{cls.__qualname__}", __version__, tinygrad, key))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def recall(backend, key: str) -> dict:
    """The answers remembered for `backend` under `key` (a dict, empty when none)."""
    global _memory
    with _lock:
        if _memory is None:
            _memory = _read(_path())
        return dict(_memory.get(digest(backend, key), {}))


def remember(backend, key: str, **answers) -> None:
    """Keep `answers` (JSON values) for `backend` under `key`, in this process and on disk. A cache that
    cannot be written is left alone: the answers are then found again by the next process."""
    global _memory
    name = digest(backend, key)
    with _lock:
        if _memory is None:
            _memory = _read(_path())
        entry = {**_memory.get(name, {}), **answers}
        if _memory.get(name) == entry:
            return
        _memory[name] = entry
        _write(_path(), _memory)


def _read(path: pathlib.Path) -> dict[str, dict]:
    try:
        data = json.loads(trust.read_trusted(path)[:1 << 20])    # a plain file, yours alone
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}


def _write(path: pathlib.Path, entries: dict[str, dict]) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps({"format": FORMAT, "entries": entries}, sort_keys=True).encode()))
    except OSError:     # a full disk, a folder others may write (UnsafeFileError): found again next time
        pass


def files_key(*patterns: str) -> str:
    """Part of a probe key: each existing path matching the glob patterns, with its size, modification
    time and inode (a driver or library installed, updated or removed changes it); cheap to compute."""
    import glob
    parts = []
    for pattern in patterns:
        for p in sorted(glob.glob(pattern)):
            try:
                st = os.stat(p)
                parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
            except OSError:
                parts.append(f"{p}:?")
        parts.append("|")
    return ";".join(parts)


def env_key(*prefixes: str) -> str:
    """Part of a probe key: the environment variables whose names start with one of `prefixes`."""
    return ";".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(prefixes))
