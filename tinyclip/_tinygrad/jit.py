"""TinyJit internals (tinygrad/engine/jit.py) that the runner and the graph cache rely on.

  _TinyJit.cnt        0: the next call runs plain, 1: the next call captures, >= 2: calls run the graph
  _TinyJit.captured   the CapturedJit (ret, _linear, expected_names, expected_input_info) once captured
  _TinyJit(None, captured)   a JIT that only runs `captured`; it raises JitError when the inputs differ
  BEAM                compile_linear searches kernels with BEAM=n while a JIT captures (jit_lower)
  lower_and_compile   compiles a capture's kernels; under BEAM in this process (beam_progress counts them)

Pickling a captured graph without its weights lives beside this, in graph_pickle.py.
"""
from __future__ import annotations

import contextlib

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



@contextlib.contextmanager
def beam_progress(on_kernel):
    """Inside, `on_kernel(i, n)` is called before each kernel that a capture lowers and compiles in
    this process (under BEAM, every kernel: its search times candidates on the device, so tinygrad
    does it here, one kernel after the other), i counting from 1 to the n it compiles in that batch.

    tinygrad 0.14 (engine/realize.py): compile_linear -> lower_and_compile(linear), which collects the
    CALLs to compile (_get_call_to_compile), drops those in to_program_cache (by to_program_key) and
    maps _compile_kernel over the rest; both are looked up as module globals at each call.
    """
    from tinygrad.engine import realize
    from tinygrad.uop.ops import Ops
    real_lower, real_compile = realize.lower_and_compile, realize._compile_kernel
    count = {"i": 0, "n": 0, "depth": 0}

    def lower_and_compile(linear):
        # the search realizes small buffers of its own (nested calls): only the outermost call's kernels count
        count["depth"] += 1
        try:
            if count["depth"] == 1:
                # kernels given as C source (source.py) are compiled as they are, before tinygrad's, and not searched
                calls = [a for c in linear.toposort()
                         if c.op is Ops.CALL and (a := realize._get_call_to_compile(c)) is not None
                         and a[0].op is not Ops.PROGRAM]
                count["i"], count["n"] = 0, len({k for k in (realize.to_program_key(*a) for a in calls)
                                                 if k not in realize.to_program_cache})
            return real_lower(linear)
        finally:
            count["depth"] -= 1

    def compile_kernel(x):
        if count["depth"] == 1:
            count["i"] += 1
            on_kernel(count["i"], max(count["n"], count["i"]))
        return real_compile(x)

    realize.lower_and_compile, realize._compile_kernel = lower_and_compile, compile_kernel
    try:
        yield
    finally:
        realize.lower_and_compile, realize._compile_kernel = real_lower, real_compile
