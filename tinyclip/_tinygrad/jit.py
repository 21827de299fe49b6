"""TinyJit internals (tinygrad/engine/jit.py) that the runner and the graph cache rely on.

  _TinyJit.cnt        0: the next call runs plain, 1: the next call captures, >= 2: calls run the graph
  _TinyJit.captured   the CapturedJit (ret, _linear, expected_names, expected_input_info) once captured
  _TinyJit(None, captured)   a JIT that only runs `captured`; it raises JitError when the inputs differ
  BEAM                compile_linear searches kernels with BEAM=n while a JIT captures (jit_lower)

Pickling a captured graph without its weights lives beside this, in graph_pickle.py.
"""
from __future__ import annotations

from tinygrad.helpers import Context

def new_jit(fn, capture_first: bool = True):
    """A TinyJit of `fn`. With capture_first it captures on its first call; tinygrad's default runs
    `fn` plain once and captures on the second call, which schedules every kernel twice."""
    from tinygrad.engine.jit import _TinyJit
    jit = _TinyJit(fn)
    if capture_first:
        jit.cnt = 1
    return jit


def captured_graph(jit):
    """The CapturedJit of a TinyJit that has captured, else None."""
    return jit.captured


def jit_from_captured(captured):
    """A TinyJit that runs an already captured graph (one loaded from disk) and never captures."""
    from tinygrad.engine.jit import _TinyJit
    return _TinyJit(None, captured)


def jit_error() -> type[Exception]:
    """The exception a TinyJit raises when a call's inputs do not match the captured ones."""
    from tinygrad.engine.jit import JitError
    return JitError


def beam_context(beam: int):
    """Settings under which a JIT capture beam-searches its kernels (tinygrad's BEAM=n)."""
    return Context(BEAM=beam)


def beam_setting() -> int:
    """The beam width a JIT capture uses now: JITBEAM, else BEAM (environment or enclosing Context)."""
    from tinygrad.helpers import BEAM, getenv
    return int(getenv("JITBEAM", BEAM.value))

