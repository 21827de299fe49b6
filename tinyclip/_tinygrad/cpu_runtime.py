"""Patches to tinygrad's CPU runtime and code generator that tinyclip's CPU kernels need.

They are installed by `install()`, which the CPU kernel set calls the first time it is used, never on
import: a CUDA user, or a user's own kernels run before tinyclip's CPU set is chosen, see tinygrad as
it is. Both patches touch only what tinyclip's kernels (named tc<lanes>_...) or THREAD-split CPU
kernels do; everything else goes through tinygrad's own code.

They are written against tinygrad TESTED_TINYGRAD. On another version `install()` installs nothing,
warns once, and returns False: the CPU kernel set then runs tinygrad's default kernels, slower and
still exact.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import queue
import re
import threading
import time
import warnings

from tinygrad import dtypes
from tinygrad.uop.ops import Ops

TESTED_TINYGRAD = ("0.14.0",)
_installed: bool | None = None


def install() -> bool:
    """Install both patches (once per process); False, with a warning, on an untested tinygrad."""
    global _installed
    if _installed is None:
        version = tinygrad_version()
        if version not in TESTED_TINYGRAD:
            warnings.warn(f"tinyclip: tinygrad {version} is not the version tinyclip's CPU kernels were written for "
                          f"({', '.join(TESTED_TINYGRAD)}); using tinygrad's default CPU kernels instead (same results, "
                          "slower). Install tinygrad==" + TESTED_TINYGRAD[-1] + " for the fast path.", stacklevel=3)
            _installed = False
        else:
            use_wide_vectors()
            use_parallel_threads()
            _installed = True
    return _installed


def tinygrad_version() -> str:
    try:
        return importlib.metadata.version("tinygrad")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- wide float vectors for tinyclip's CPU kernels (tinygrad/codegen/late/coalesce.py) --------------
# tinygrad 0.14 groups consecutive float loads and stores into vectors of at most 4 lanes
# (memory_coalescing, called from tinygrad.codegen.full_rewrite_to_sink): on x86-64 that makes every
# FMA 128 bits wide, a half of AVX2 and a quarter of AVX-512. For kernels named tc<lanes>_... (see
# wide_name), on CPU renderers, the pass below groups float32 accesses into vectors of up to <lanes>
# (8: 256 bits, 16: 512 bits) instead; every other kernel goes through tinygrad's own pass unchanged.
# Only the width of the vectors changes, not the arithmetic: each output is the same sum in the same
# order. tinygrad compiles in spawned worker processes, which start from a fresh import: the pool's
# initializer (tinygrad.engine.worker._init_worker, looked up when the pool is made) is replaced by
# one that installs the pass there too. A pool made before that is ended: its workers lack the pass, and
# when one of them is replaced (after 16 kernels) the pool pickles its initializer by name, which names
# the replacement by then: the pickling fails in the pool's worker-handler thread, no worker replaces it
# and the compile waits forever. The next compile makes a new pool.
WIDE_NAME = re.compile(r"^tc(\d+)_")   # tinyclip's kernels are named tc<lanes>_...: the widest vector to make


def wide_name(lanes: int, name: str) -> str:
    """The name to give a kernel whose float32 accesses should be grouped into vectors of up to `lanes`."""
    return f"tc{lanes}_{name}"


def use_wide_vectors() -> None:
    """Install the wide-vector pass for tc<lanes>_ kernels, in this process and in compile workers."""
    import tinygrad.codegen as codegen
    import tinygrad.engine.worker as worker
    if getattr(codegen.memory_coalescing, "tinyclip_wide", False):
        return
    tinygrad_pass = codegen.memory_coalescing

    def memory_coalescing(sink, ren):
        wide = WIDE_NAME.match(getattr(sink.arg, "name", "") or "")
        if ren is not None and ren.target.device == "CPU" and wide:
            return _coalesce_wide(sink, int(wide.group(1)))
        return tinygrad_pass(sink, ren)

    memory_coalescing.tinyclip_wide = True
    codegen.memory_coalescing = memory_coalescing
    if worker._init_worker is not _init_compile_worker:
        global _tinygrad_init_worker
        _tinygrad_init_worker = worker._init_worker
        worker._init_worker = _init_compile_worker
        worker.terminate_worker_pool()     # one made with tinygrad's initializer (see above)


_tinygrad_init_worker = None


def _init_compile_worker():
    """Initializer of tinygrad's compile workers: the wide-vector pass (which keeps tinygrad's own
    initializer in _tinygrad_init_worker), then tinygrad's own set-up."""
    use_wide_vectors()
    _tinygrad_init_worker()


def _coalesce_wide(sink, lanes: int):
    """Replace runs of float32 loads (or stores) at consecutive constant offsets from one index
    expression with vector accesses of `lanes`, lanes/2, ... 2 lanes, each starting at an offset its width
    divides (so it is aligned like tinygrad's own vectors). Other accesses are left as they are.

    Register buffers (a reduction's accumulators, `float acc[rows*cols]` in C) are grouped too, but only
    where every access to the buffer becomes a whole vector of `lanes`: the compiler then keeps them as
    vector registers. Left as scalars, clang 14 re-vectorizes the accumulation loop with each
    accumulator live twice (the old sum and the new), which on AVX2's 16 registers spills a 6x2 tile
    to the stack every step (34 against 95 GFLOPS a core on Zen 4). Partly grouped, the array would
    stay in memory and its vector accesses would assume an alignment the array does not have."""
    from collections import defaultdict
    from tinygrad.uop.ops import AddrSpace, UOp
    widths = [1 << i for i in range(lanes.bit_length() - 1, -1, -1)]   # lanes (a power of two) down to 1
    runs = defaultdict(dict)   # (op, buffer, base index, valid) -> {constant offset: [accesses]}
    registers = defaultdict(list)   # register buffer -> [(access, the width of the vector it joins)]
    for u in sink.toposort():
        if u.op not in (Ops.LOAD, Ops.STORE) or u.src[0].op is not Ops.INDEX:
            continue
        buf, index = u.src[0].src
        if buf.dtype != dtypes.float32 or len(u.src) != (1 if u.op is Ops.LOAD else 2):
            if buf.addrspace == AddrSpace.REG:
                registers[buf].append((u, 1))
            continue
        idx, valid = index.get_idx(), index.get_valid()
        base, const = idx, 0
        if idx.op is Ops.ADD and idx.src[1].op is Ops.CONST:
            base, const = idx.src[0], idx.src[1].arg
        elif idx.op is Ops.CONST:
            base, const = None, idx.arg
        if not isinstance(const, int):
            if buf.addrspace == AddrSpace.REG:
                registers[buf].append((u, 1))
            continue
        runs[(u.op, buf, base, valid)].setdefault(const, []).append(u)
    replace = {}
    for (op, buf, base, valid), at in runs.items():
        offsets = sorted(at)
        i = 0
        while i < len(offsets):
            start = offsets[i]
            first = UOp.const(start) if base is None else base + start
            n = next(n for n in widths if offsets[i:i + n] == list(range(start, start + n)) and
                     (n == 1 or first.divides(n) is not None))
            if n == 1 or (op is Ops.STORE and any(len(at[o]) != 1 for o in offsets[i:i + n])):
                if buf.addrspace == AddrSpace.REG:
                    registers[buf].extend((u, 1) for u in at[start])
                i += 1
                continue
            if buf.addrspace == AddrSpace.REG:
                registers[buf].extend((u, n) for o in offsets[i:i + n] for u in at[o])
            where = first.valid(valid) if valid is not None else first
            vec = UOp(Ops.SHRINK, src=(buf, where, UOp.const(n)))
            if op is Ops.STORE:
                store = vec.store(UOp.stack(*[at[o][0].src[1] for o in offsets[i:i + n]]))
                replace.update({at[o][0]: store for o in offsets[i:i + n]})
            else:
                load = vec.load()
                replace.update({u: load.index(lane) for lane, o in enumerate(offsets[i:i + n]) for u in at[o]})
            i += n
    for accesses in registers.values():
        if any(n != lanes for _, n in accesses):
            for u, _ in accesses:
                replace.pop(u, None)
    return sink.substitute(replace, name="tinyclip wide coalescing")


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



def handoff_seconds() -> float:
    """One round trip through a helper thread, as a split kernel makes it: queue a call, wait for its reply."""
    tasks, done = _helper_tasks(), queue.SimpleQueue()
    start = time.perf_counter()
    tasks.put((_nothing, (), done))
    done.get()
    return time.perf_counter() - start


def _nothing() -> None:
    pass
