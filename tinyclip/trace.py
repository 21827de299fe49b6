"""Where a process's start-up time goes: one line per phase on stderr, when asked for.

TINYCLIP_TRACE=1 (or `tinyclip --trace COMMAND ...`) prints, as each phase ends,

    tinyclip: trace: imports 0.41 s (since the process started)
    tinyclip: trace: backend 0.12 s (cpu, CPU, cpu 0.11 s)
    tinyclip: trace: weights 0.25 s (cpu 0.40 s)
    tinyclip: trace: graph image encoder for batches of 1: read from the graph cache 0.03 s (cpu 0.03 s)
    tinyclip: trace: graph image encoder for batches of 1: first run 0.07 s (cpu 0.13 s)

so that a user who finds a command slow can see why. Each phase gives its wall-clock seconds and the
CPU seconds of the whole process meanwhile (all its threads: on a machine that others share, the wall
time says more about them). Nothing is printed unless tracing is on; measuring costs four clock reads
a phase.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

ENV = "TINYCLIP_TRACE"
_IMPORTED = time.perf_counter()     # when tinyclip (this module is among its first) was imported
_reported_imports = False


def enabled() -> bool:
    return os.environ.get(ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")


def line(message: str) -> None:
    """One trace line on stderr (nothing when tracing is off)."""
    if enabled():
        from . import progress
        progress.clear()
        print(f"tinyclip: trace: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(name: str):
    """Time the block; on exit print `name` with its seconds and whatever the block put in the yielded
    list of details ("loaded", "compiled", sizes)."""
    if not enabled():
        yield []
        return
    details: list[str] = []
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield details
    finally:
        details.append(f"cpu {time.process_time() - cpu:.2f} s")
        line(f"{name} {time.perf_counter() - start:.2f} s ({', '.join(details)})")


def imports() -> None:
    """Print, once per process, the seconds from the interpreter's start to now: Python, tinyclip and
    the libraries it imported (the kernel's record of the process's start, where it has one)."""
    global _reported_imports
    if _reported_imports or not enabled():
        return
    _reported_imports = True
    started = process_start()
    now = time.time()
    if started is not None:
        line(f"imports {now - started:.2f} s (since the process started)")
    else:
        line(f"imports {time.perf_counter() - _IMPORTED:.2f} s (since tinyclip was imported)")


def process_start() -> float | None:
    """The process's start as a time.time() value, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as f:
            uptime = float(f.read().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
        return time.time() - uptime + int(fields[19]) / ticks     # field 22 of stat: starttime in ticks
    except (OSError, ValueError, IndexError):
        return None
