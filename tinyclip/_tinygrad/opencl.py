"""OpenCL builds without the compiler's summary line on stderr (tinygrad/runtime/ops_cl.py).

tinygrad's CLCompiler.compile builds a kernel's source with clBuildProgram. PoCL (OpenCL on the CPU)
compiles it with clang in the same process, and clang writes "1 warning generated." straight to file
descriptor 2 for a kernel it has a warning about (the warning itself goes to the build log, which
tinygrad reads only when the build fails): a user sees the line several times, with nothing to act
on. `quiet_builds(device)` gives the opened device a CLCompiler subclass whose builds run with fd 2
pointed at a temporary file; afterwards everything written there is passed on except clang's
"N warning(s) generated." lines. A build that fails raises as before (tinygrad puts the log in the
CompileError).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

WARNINGS_GENERATED = re.compile(rb"^\d+ warnings? generated\.\s*$")
_lock = threading.Lock()     # fd 2 is the process's: one build at a time redirects it


@contextlib.contextmanager
def stderr_without_warning_counts():
    """Inside, what is written to fd 2 is held, then written out without clang's warning counts."""
    with _lock, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = b"".join(line for line in held.read().splitlines(keepends=True)
                            if not WARNINGS_GENERATED.match(line))
            if kept:
                os.write(2, kept)


def quiet_builds(device: str) -> None:
    """Make the opened OpenCL `device` build kernels through QuietCLCompiler (once; nothing when the
    device does not open: the backend's probe says why)."""
    try:
        from tinygrad import Device
        from tinygrad.runtime.ops_cl import CLCompiler
        dev = Device[device]
    except Exception:
        return
    compiler = getattr(dev, "cl_compiler", None)
    if type(compiler) is CLCompiler:
        compiler.__class__ = _quiet_class(CLCompiler)


_quiet = None


def _quiet_class(base):
    global _quiet
    if _quiet is None:
        class QuietCLCompiler(base):
            def compile(self, src: str) -> bytes:
                with stderr_without_warning_counts():
                    return super().compile(src)
        _quiet = QuietCLCompiler
    return _quiet
