"""Every tinygrad-specific workaround in one place.

tinygrad moves fast (setup.cfg pins the tested range); what tinyclip relies
on beyond plain Tensor operations is wrapped here, so an upgrade touches one
file.
"""
from __future__ import annotations

import ctypes
import os
import queue
import stat
import threading
import time
import warnings

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import Context
from tinygrad.uop.ops import Ops

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16}


def dtype_named(name) -> DType:
    if isinstance(name, DType):
        name = name.name if name.name != "float" else "float32"
    if name in (None, "fp32", "float", "float32"):
        return dtypes.float32
    if name in ("fp16", "half", "float16"):
        return dtypes.float16
    raise ValueError(f"dtype {name!r} is not supported; use 'float32' or 'float16'")


def device_families() -> set[str]:
    """The device names this tinygrad knows (CPU, CL, CUDA, METAL, ...)."""
    return set(Device._devices)


def probe_device(device: str, context=None) -> str | None:
    """Run one tiny kernel on `device`; None if it gives the right answer, else why not.

    tinygrad opens devices lazily and only fails on first use, so asking it to
    compute is the one honest availability test.
    """
    try:
        with context if context is not None else Context():
            Device[device]   # open it first: its own start-up programs may come from the kernel cache
            x = Tensor([1.0, 2.0, 3.0], device=device).realize()
            # CACHELEVEL=0: compile the test kernel for real, so a cached binary cannot hide a
            # missing compiler.
            with Context(CACHELEVEL=0):
                got = (x * 2).tolist()
    except Exception as e:
        return _reason(e)
    return None if got == [2.0, 4.0, 6.0] else f"wrong result {got} from a test kernel"


def open_device(device: str, context=None) -> str | None:
    """None when tinygrad opens `device`, else why not. Lighter than probe_device: no kernel of
    tinyclip's is scheduled, compiled or run (tinygrad's first schedule in a process costs a few
    hundred ms of pattern compiling)."""
    try:
        with context if context is not None else Context():
            Device[device]
    except Exception as e:
        return _reason(e)
    return None


def _reason(e: BaseException) -> str:
    """One line: the exception's type and first line, and those of each sub-exception of a group
    (tinygrad raises an ExceptionGroup when none of a device's interfaces opens)."""
    text = str(e).strip()
    first = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
    subs = "; ".join(_reason(s) for s in getattr(e, "exceptions", ()))
    return (f"{first} ({subs})" if subs else first)[:300]


def supports_half(device: str, context=None) -> bool:
    try:
        with context if context is not None else Context():
            return Tensor([1.5], device=device).cast(dtypes.float16).mul(2).cast(dtypes.float32).tolist() == [3.0]
    except Exception:
        return False


def gather_rows(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx], gathered in float32 (exact) and cast back: tinygrad 0.14 may lower a float16
    lookup to a one-hot sum over the table whose half accumulator fails to compile on the LLVM
    and OpenCL renderers."""
    return table.float()[idx].cast(table.dtype)


# numpy dtype -> tinygrad dtype, for the arrays tinyclip moves to and from devices itself
NUMPY_DTYPES = {np.dtype(np.float32): dtypes.float32, np.dtype(np.float16): dtypes.float16,
                np.dtype(np.int32): dtypes.int32}
_TO_NUMPY = {v: k for k, v in NUMPY_DTYPES.items()}


def numpy_dtype(dtype: DType) -> np.dtype:
    """The numpy dtype of a tinygrad dtype in NUMPY_DTYPES (float32, float16, int32)."""
    return _TO_NUMPY[dtype]


def from_numpy(array: np.ndarray, device: str) -> Tensor:
    """A realized tensor holding a copy of a float32, float16 or int32 array (any strides), in a new
    buffer: written in place in one pass where the buffer is host memory, else copied in by the
    device's allocator. `Tensor(array).realize()` would go through tinygrad's scheduler, and
    Buffer.copy_from through a compiled copy, milliseconds each: for the ~400 weights of a
    checkpoint that was most of a load. (Allocator._copyin is a tinygrad internal.)"""
    dtype = NUMPY_DTYPES[array.dtype]
    t, view = host_tensor(array.shape, dtype, device)
    if view is not None:
        np.copyto(np.frombuffer(view, array.dtype).reshape(array.shape), array)
        return t
    t = Tensor.empty(*array.shape, dtype=dtype, device=device)
    if array.size:   # an empty tensor has no buffer to allocate
        buf = t.uop.buffer.allocate()
        buf.allocator._copyin(buf._buf, memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B"))
    return t


def host_tensor(shape: tuple[int, ...], dtype: DType, device: str) -> tuple[Tensor, memoryview | None]:
    """A new realized tensor and, where its buffer is host memory (the CPU device), a writable
    byte view of that buffer to read into; (None, None) elsewhere. (Allocator._as_buffer is a
    tinygrad internal.)"""
    if device.split(":")[0] != "CPU" or 0 in shape:
        return None, None
    t = Tensor.empty(*shape, dtype=dtype, device=device)
    buf = t.uop.buffer.allocate()
    if not hasattr(buf.allocator, "_as_buffer"):
        return None, None
    return t, buf.allocator._as_buffer(buf._buf).cast("B")


def host_array(t: Tensor) -> np.ndarray:
    """The values of a realized tensor as numpy: the tensor's own host buffer, not a copy, where
    it has one and is laid out as `t` (as from_numpy and host_tensor make them; valid while `t`
    lives, and not to be written), else a copy made by t.numpy()."""
    base = t.uop.base
    plain = t.uop is base or (t.uop.op is Ops.RESHAPE and t.uop.src[0] is base)
    if not plain or t.dtype not in _TO_NUMPY or not base.is_realized or (buf := base.buffer).size != t.numel() \
            or buf.offset or not hasattr(buf.allocator, "_as_buffer"):
        return t.numpy()
    return np.frombuffer(buf.allocator._as_buffer(buf._buf), numpy_dtype(t.dtype)).reshape(t.shape)


def to_tensor(array: np.ndarray, device: str) -> Tensor:
    """A numpy array onto a device, copied once. float32, float16 and int32 arrays (the encoders'
    inputs) go by from_numpy, without tinygrad's scheduler: a new process's first schedule costs
    it a few hundred ms of pattern compiling."""
    if array.dtype in NUMPY_DTYPES:
        return from_numpy(array, device)
    return Tensor(np.ascontiguousarray(array), device=device)


def to_numpy(t: Tensor) -> np.ndarray:
    """A copy of a realized tensor's values (an encoder's output, whose buffer the JIT reuses)."""
    return host_array(t).copy()


def as_float32(t: Tensor) -> np.ndarray:
    """Realize `t` (inside the caller's backend context) as a float32 numpy array."""
    return (t.float() if t.dtype != dtypes.float32 else t).numpy()


def guard_kernel_cache() -> None:
    """tinygrad reads its kernel cache back with pickle: use it only when the
    current user owns it and nobody else may write to it; otherwise switch the
    cache off (CACHELEVEL=0) for this process, with a warning that says why."""
    from tinygrad import helpers
    path = helpers.CACHEDB
    reason = untrusted(path) or untrusted(os.path.dirname(path))
    if reason:
        helpers.CACHELEVEL.value = 0
        warnings.warn(f"tinygrad's kernel cache {path} is not safe to read ({reason}); tinyclip disabled it "
                      "for this process. Remove it or set CACHEDB to a file only you can write.", stacklevel=2)


# ---- TinyJit internals (tinygrad/engine/jit.py) ------------------------------------------------------
# tinyclip's graph cache (tinyclip/graph_cache.py) keeps captured JITs between processes. It relies on:
#   _TinyJit.cnt        0: the next call runs plain, 1: the next call captures, >= 2: calls run the graph
#   _TinyJit.captured   the CapturedJit (ret, _linear, expected_names, expected_input_info) once captured
#   _TinyJit(None, captured)   a JIT that only runs `captured`; it raises JitError when the inputs differ
#   BEAM                compile_linear searches kernels with BEAM=n while a JIT captures (jit_lower)

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


# ---- 8-lane float vectors for tinyclip's CPU kernels (tinygrad/codegen/late/coalesce.py) -------------
# tinygrad 0.14 groups consecutive float loads and stores into vectors of at most 4 lanes
# (memory_coalescing, called from tinygrad.codegen.full_rewrite_to_sink): on x86-64 that makes every
# FMA 128 bits wide, half of what AVX2 does. For kernels whose name starts with WIDE_PREFIX, on CPU
# renderers, the pass below groups float32 accesses into 8 lanes (256 bits) instead; every other kernel
# goes through tinygrad's own pass unchanged. Only the width of the vectors changes, not the
# arithmetic: each output is the same sum in the same order.
# tinygrad compiles in spawned worker processes, which start from a fresh import: the pool's
# initializer (tinygrad.engine.worker._init_worker, looked up when the pool is made) is replaced by
# one that installs the pass there too. A pool made before tinyclip was imported compiles 4-lane
# kernels: slower, same results.
WIDE_PREFIX = "panel_"
WIDE_LANES = (8, 4, 2, 1)


def use_wide_vectors() -> None:
    """Install the 8-lane pass for WIDE_PREFIX kernels, in this process and in compile workers."""
    import tinygrad.codegen as codegen
    import tinygrad.engine.worker as worker
    if getattr(codegen.memory_coalescing, "tinyclip_wide", False):
        return
    tinygrad_pass = codegen.memory_coalescing

    def memory_coalescing(sink, ren):
        name = getattr(sink.arg, "name", "") or ""
        if ren is not None and ren.target.device == "CPU" and name.startswith(WIDE_PREFIX):
            return _coalesce_wide(sink)
        return tinygrad_pass(sink, ren)

    memory_coalescing.tinyclip_wide = True
    codegen.memory_coalescing = memory_coalescing
    if worker._init_worker is not _init_compile_worker:
        global _tinygrad_init_worker
        _tinygrad_init_worker = worker._init_worker
        worker._init_worker = _init_compile_worker


_tinygrad_init_worker = None


def _init_compile_worker():
    """Initializer of tinygrad's compile workers: the 8-lane pass (which keeps tinygrad's own
    initializer in _tinygrad_init_worker), then tinygrad's own set-up."""
    use_wide_vectors()
    _tinygrad_init_worker()


def _coalesce_wide(sink):
    """Replace runs of float32 loads (or stores) at consecutive constant offsets from one index
    expression with vector accesses of 8, 4 or 2 lanes, each starting at an offset its width
    divides (so it is aligned like tinygrad's own vectors). Other accesses are left as they are."""
    from collections import defaultdict
    from tinygrad.uop.ops import AddrSpace, UOp
    runs = defaultdict(dict)   # (op, buffer, base index, valid) -> {constant offset: [accesses]}
    for u in sink.toposort():
        if u.op not in (Ops.LOAD, Ops.STORE) or u.src[0].op is not Ops.INDEX:
            continue
        buf, index = u.src[0].src
        if buf.addrspace == AddrSpace.REG or buf.dtype != dtypes.float32 or len(u.src) != (1 if u.op is Ops.LOAD else 2):
            continue
        idx, valid = index.get_idx(), index.get_valid()
        base, const = idx, 0
        if idx.op is Ops.ADD and idx.src[1].op is Ops.CONST:
            base, const = idx.src[0], idx.src[1].arg
        elif idx.op is Ops.CONST:
            base, const = None, idx.arg
        if not isinstance(const, int):
            continue
        runs[(u.op, buf, base, valid)].setdefault(const, []).append(u)
    replace = {}
    for (op, buf, base, valid), at in runs.items():
        offsets = sorted(at)
        i = 0
        while i < len(offsets):
            start = offsets[i]
            first = UOp.const(start) if base is None else base + start
            n = next(n for n in WIDE_LANES if offsets[i:i + n] == list(range(start, start + n)) and
                     (n == 1 or first.divides(n) is not None))
            if n == 1 or (op is Ops.STORE and any(len(at[o]) != 1 for o in offsets[i:i + n])):
                i += 1
                continue
            where = first.valid(valid) if valid is not None else first
            vec = UOp(Ops.SHRINK, src=(buf, where, UOp.const(n)))
            if op is Ops.STORE:
                store = vec.store(UOp.stack(*[at[o][0].src[1] for o in offsets[i:i + n]]))
                replace.update({at[o][0]: store for o in offsets[i:i + n]})
            else:
                load = vec.load()
                replace.update({u: load.index(lane) for lane, o in enumerate(offsets[i:i + n]) for u in at[o]})
            i += n
    return sink.substitute(replace, name="tinyclip 8-lane coalescing")


# ---- CPU kernels split between threads really run on several cores (tinygrad/runtime/ops_cpu.py) ----
# A kernel given the THREAD opt takes a `core_id` argument and computes 1/n of the output per call.
# tinygrad 0.14's CPUProgram.__call__ makes those n calls one after the other in the calling thread,
# so a CPU kernel uses one core whatever THREAD says (the user time of a ViT-B/32 batch equals its
# wall time). CPUProgram.__call__ is replaced by one that hands calls 1..n-1 to helper threads,
# makes call 0 itself and returns when all are done. ctypes releases the GIL while the compiled
# function runs, and the calls write disjoint parts of the output: the results are the same, only
# computed at the same time. Kernels without core_id run as before.
# The helpers take (function, arguments, reply queue) from a queue and call the compiled function
# directly: a hand-off costs a thread wake-up (tens of microseconds here), not a Future.
_helpers = None   # (pid that started them, task queue)


def use_parallel_threads() -> None:
    """Install the threaded CPUProgram.__call__ (once per process)."""
    from tinygrad.runtime import ops_cpu
    if getattr(ops_cpu.CPUProgram.__call__, "tinyclip_parallel", False):
        return
    serial_call = ops_cpu.CPUProgram.__call__

    def __call__(self, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False, timeout=None):
        slot = self.runtimevars.get("core_id")
        if slot is None or self.lvp or global_size[0] <= 1:
            return serial_call(self, *bufs, global_size=global_size, local_size=local_size, vals=vals, wait=wait,
                               timeout=timeout)
        start = time.perf_counter()
        args = [ctypes.c_uint64(b.va_addr) for b in bufs] + [None if v is None else ctypes.c_uint64(v) for v in vals]
        tasks, done = _helper_tasks(), queue.SimpleQueue()   # this call's parts report to this call
        for tid in range(1, global_size[0]):
            tasks.put((self.fxn, (*args[:slot], ctypes.c_uint64(tid), *args[slot + 1:]), done))
        try:
            self.fxn(*args[:slot], ctypes.c_uint64(0), *args[slot + 1:])
        finally:
            errors = [e for e in (done.get() for _ in range(1, global_size[0])) if e is not None]
        if errors:
            raise errors[0]
        return time.perf_counter() - start if wait else None

    __call__.tinyclip_parallel, __call__.tinyclip_serial = True, serial_call
    ops_cpu.CPUProgram.__call__ = __call__


def _helper_tasks() -> queue.SimpleQueue:
    """The helper threads' task queue: NUM_CPU_THREADS - 1 daemon threads (tinygrad's count, which
    respects cgroup limits), started again in a forked child, where the parent's threads do not
    exist."""
    global _helpers
    if _helpers is None or _helpers[0] != os.getpid():
        from tinygrad.helpers import NUM_CPU_THREADS
        tasks = queue.SimpleQueue()
        for i in range(max(1, NUM_CPU_THREADS.value - 1)):
            threading.Thread(target=_helper, args=(tasks,), name=f"tinyclip-cpu-{i}", daemon=True).start()
        _helpers = (os.getpid(), tasks)
    return _helpers[1]


def _helper(tasks: queue.SimpleQueue) -> None:
    while True:
        fxn, args, done = tasks.get()
        try:
            fxn(*args)
            done.put(None)
        except BaseException as e:   # reported by the caller, which waits for every part
            done.put(e)
