"""Writing a file whole or not at all: the one way tinyclip writes files.

`write_atomic` writes to a new private temporary file in the target's folder, created with
O_CREAT|O_EXCL|O_NOFOLLOW under a random name (so a link or file planted at a temporary name is
never written through: the creation fails instead), fsyncs it and renames it over the target
(rename replaces a link at the target's name; it never writes where the link points). On any
failure, a full disk or an interrupt included, the temporary file is removed and the target is
left as it was. Caches (`private=True`) are written only into a folder that tinyclip.trust would
read from, so that what is saved can be trusted when it is read back.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from typing import Callable, BinaryIO

from . import trust
from .errors import UnsafeFileError

TRIES = 16    # random temporary names tried before giving up (another file has each of them)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, private: bool = True,
                 tmp_prefix: str = ".") -> pathlib.Path:
    """Create or replace `path` with what `write(f)` writes to the binary file `f`.

    Parameters
    ----------
    path : the file to write; its folder must exist.
    write : called once with the open temporary file.
    private : True for tinyclip's caches: the file is 0600 and the folder must pass trust.untrusted()
        (UnsafeFileError otherwise). False for a user's output (an .npz, a shard): the file gets the
        usual permissions (0666 less the umask) and any folder the user may write is fine.
    tmp_prefix : how the temporary file's name begins (a leading dot hides it).

    Raises
    ------
    UnsafeFileError, OSError
        nothing written: the temporary file is gone and `path` is unchanged.
    """
    path = pathlib.Path(path)
    folder = path.parent
    if private and (why := trust.untrusted(folder)):
        raise UnsafeFileError(f"not writing {path}: {why}")
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_BINARY", 0))
    mode = 0o600 if private else 0o666
    for _ in range(TRIES):
        tmp = folder / f"{tmp_prefix}{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, mode)
            break
        except FileExistsError:     # taken (or planted): another name
            continue
    else:
        raise FileExistsError(f"{folder}: no free temporary file name for {path.name} after {TRIES} tries")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename itself durable where the system allows (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
