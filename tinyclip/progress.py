"""One status line on stderr while tinyclip waits (loading a model, compiling a graph).

Drawn only when stderr is a terminal, so that pipes, logs and tests get nothing, and cleared when
the wait ends. TINYCLIP_PROGRESS=0 silences it on a terminal too.
"""
from __future__ import annotations

import os
import sys

ENV = "TINYCLIP_PROGRESS"
_shown = False


def enabled(stream=None) -> bool:
    """Whether status lines are drawn: on a terminal, unless TINYCLIP_PROGRESS is 0/false/no/off."""
    stream = stream or sys.stderr
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return hasattr(stream, "isatty") and stream.isatty()


def status(message: str, stream=None) -> None:
    """Show `message` as the status line, replacing the one before."""
    global _shown
    stream = stream or sys.stderr
    if enabled(stream):
        stream.write(f"\r\033[K{message}")
        stream.flush()
        _shown = True


def clear(stream=None) -> None:
    """Remove the status line, if one is shown."""
    global _shown
    stream = stream or sys.stderr
    if _shown:
        stream.write("\r\033[K")
        stream.flush()
        _shown = False


def compiling(key: tuple, stream=None) -> None:
    """The status line while a runner key's graph compiles (seconds to a minute, once per shape)."""
    status(f"compiling the {graph_name(key)}, once ...", stream)


def tuning(key: tuple, beam: int, kernel: int, kernels: int, seconds: float, stream=None) -> None:
    """The status line while `tinyclip tune` beam-searches the kernels of a runner key's graph (minutes)."""
    at = f": kernel {kernel} of {kernels} ({seconds:.0f} s so far)" if kernels else ""
    status(f"tuning the {graph_name(key)} with BEAM={beam}{at} ...", stream)


def graph_name(key: tuple) -> str:
    """A runner key's graph in words: "image encoder for batches of 32", "text encoder for 12 tokens (batches of 8)"."""
    if key[0] == "image":
        return f"image encoder for batches of {key[1]}"
    return f"text encoder for {key[2]} tokens (batches of {key[1]})"
