"""Whether a file is safe to read with pickle (or to run code from): it and its folder are yours alone."""
from __future__ import annotations

import os
import stat

def untrusted(path) -> str | None:
    """Why a file or folder that tinyclip would read with pickle is not safe to read (it belongs to
    another user, or group or others may write to it), or None when it is safe or does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat: {e}"
    return untrusted_stat(st, path)


def untrusted_stat(st: os.stat_result, path) -> str | None:
    """untrusted() for a file already open (os.fstat), so that what is checked is what is read."""
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None

