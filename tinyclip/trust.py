"""Which files tinyclip may read with pickle, or trust as a cache: files the user owns, that no one
else can write, in a folder no one else can write.

Everything tinyclip keeps on disk (compiled graphs, tuning measurements, label embeddings, file
hashes) and tinygrad's kernel cache are read only when they pass `untrusted()`. A path that is not
a plain file (a FIFO, a device, a socket) is never opened: opening a FIFO waits for a writer.
`read_trusted` does the check and the read in one step, on the file it opened.

`guard_kernel_cache()` runs before the first tinygrad call of every entry point (the command line,
`tinyclip.load`, the backend registry): tinygrad reads its kernel cache (sqlite of pickles, CACHEDB
or ~/.cache/tinygrad/cache.db) on its first compile or device opening, so the check must come first.
"""
from __future__ import annotations

import os
import stat
import sys
import warnings

from .errors import UnsafeFileError


def untrusted(path) -> str | None:
    """Why a file or folder that tinyclip would read with pickle is not safe to read (it is not a
    plain file or folder, belongs to another user, or group or others may write to it), or None when
    it is safe or does not exist. A symbolic link is judged by what it points to; its own folder is
    the caller's to check."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        return f"{path}: cannot stat it ({e.strerror or e})"
    return untrusted_stat(st, path)


def untrusted_stat(st: os.stat_result, path) -> str | None:
    """untrusted() for a file already open (os.fstat), so that what is checked is what is read."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return f"{path} is not a regular file ({_kind(st.st_mode)})"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


def read_trusted(path) -> bytes:
    """The bytes of the cache file `path`, read only when it and its folder pass untrusted().

    The path's type is checked without following it or opening it (a FIFO would block the open),
    then the file is opened without following a link and checked again on the open file.

    Raises
    ------
    FileNotFoundError
        when there is no such file.
    UnsafeFileError
        (a PermissionError) saying why the file must not be read.
    OSError
        when it cannot be read.
    """
    path = os.fspath(path)
    st = os.lstat(path)     # FileNotFoundError passes through
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path} is not a regular file ({'a symbolic link' if stat.S_ISLNK(st.st_mode) else _kind(st.st_mode)})")
    if why := untrusted(os.path.dirname(os.path.abspath(path))):
        raise UnsafeFileError(why)
    # O_NONBLOCK: were the file swapped for a FIFO after the lstat, opening it still returns at once.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if why := untrusted_stat(os.fstat(fd), path):
            raise UnsafeFileError(why)
        return f.read()


# ---- tinygrad's kernel cache ---------------------------------------------------------------------

_guarded = False


def kernel_cache_path() -> str:
    """The file tinygrad keeps compiled kernels in: its CACHEDB setting where tinygrad is imported
    already, else what it will compute (CACHEDB, else $XDG_CACHE_HOME or ~/.cache, /tinygrad/cache.db)."""
    helpers = sys.modules.get("tinygrad.helpers")
    if helpers is not None and isinstance(getattr(helpers, "CACHEDB", None), str):
        return helpers.CACHEDB
    if os.environ.get("CACHEDB"):
        return os.path.abspath(os.environ["CACHEDB"])
    home = "~/Library/Caches" if sys.platform == "darwin" else "~/.cache"
    return os.path.abspath(os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(home),
                                        "tinygrad", "cache.db"))


def kernel_cache_problem() -> str | None:
    """Why tinygrad must not use its kernel cache in this process, or None when it may: the file (or
    sqlite's -wal and -shm files beside it) or its folder is not safe to read, or the folder cannot
    be made or written."""
    path = kernel_cache_path()
    folder = os.path.dirname(path)
    for p in (path, path + "-wal", path + "-shm"):
        try:
            st = os.lstat(p)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            return f"{p}: cannot stat it ({e.strerror or e})"
        if stat.S_ISLNK(st.st_mode):
            if why := untrusted(p):
                return why
        elif why := untrusted_stat(st, p):
            return why
    if why := untrusted(folder):
        return why
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            return f"its folder {folder} cannot be made: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"its folder {folder} is not writable"
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not writable"
    return None


def guard_kernel_cache() -> None:
    """Switch tinygrad's kernel cache off for this process (CACHELEVEL=0, also for the processes it
    starts) when kernel_cache_problem() finds one, saying so once in one warning. Call it before the
    first tinygrad call; it never imports tinygrad, and is cheap after the first call."""
    global _guarded
    if _guarded:
        return
    _guarded = True
    if os.environ.get("CACHELEVEL") == "0" and "tinygrad.helpers" not in sys.modules:
        return      # off already, here and in child processes
    why = kernel_cache_problem()
    if why is None:
        return
    os.environ["CACHELEVEL"] = "0"       # read when tinygrad is imported, here and in child processes
    helpers = sys.modules.get("tinygrad.helpers")
    if helpers is not None:
        helpers.CACHELEVEL.value = 0
    warnings.warn(f"tinygrad's kernel cache {kernel_cache_path()} is not used ({why}): kernels compile afresh "
                  "in each process. Set CACHEDB to a file only you can write (tinyclip's own caches: "
                  "TINYCLIP_CACHE_DIR).", stacklevel=2)
