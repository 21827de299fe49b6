"""Devices: dtype names, opening and probing a device, and what it compiles for.

tinygrad opens devices lazily and reports failures as its own exceptions; these helpers turn that
into one-line reasons the backends can show.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import threading

from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import Context

from ..atomic import write_atomic
from .cpu_runtime import TESTED_TINYGRAD, tinygrad_version
from ..trust import guard_kernel_cache, read_trusted  # noqa: F401  (re-exported: it runs before tinygrad reads its cache)

DTYPES = {"float32": dtypes.float32, "float16": dtypes.float16}
# Dtypes only the linear layers compute in (the kernel set's, weights quantised at load): the model's tensors stay float32.
LINEAR_DTYPES = ("int8",)


def dtype_named(name) -> DType:
    if isinstance(name, DType):
        name = name.name if name.name != "float" else "float32"
    if name in (None, "fp32", "float", "float32"):
        return dtypes.float32
    if name in ("fp16", "half", "float16"):
        return dtypes.float16
    if name in LINEAR_DTYPES:
        return dtypes.float32
    raise ValueError(f"dtype {name!r} is not supported; use 'float32', 'float16' or 'int8'")


def device_families() -> set[str]:
    """The device names this tinygrad knows (CPU, CL, CUDA, METAL, ...)."""
    return set(Device._devices)


_attempted: list[str] = []     # device families tinyclip asked tinygrad to open, in order
_generated = 0                 # CPU device programs generated in this process (not taken from the cache)


def attempted_families() -> list[str]:
    """The device families (CPU, CL, CUDA, ...) this process asked tinygrad to open or probe, in order."""
    return list(_attempted)


def generated_device_programs() -> int:
    """How many of the CPU device's start-up programs this process generated (device_programs)."""
    return _generated


def probe_device(device: str, context=None) -> str | None:
    """Run one tiny kernel on `device`; None if it gives the right answer, else why not.

    tinygrad opens devices lazily and only fails on first use, so asking it to
    compute is the one honest availability test.
    """
    _attempted.append(device.split(":")[0].upper())
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


def open_device(device: str, context=None, programs: os.PathLike | None = None) -> str | None:
    """None when tinygrad opens `device`, else why not. Lighter than probe_device: no kernel of
    tinyclip's is scheduled, compiled or run (tinygrad's first schedule in a process costs a few
    hundred ms of pattern compiling).

    `programs`: a folder (yours alone) that keeps the CPU device's own start-up programs compiled,
    so that a later process opens the device without generating their code again (see
    device_programs)."""
    _attempted.append(device.split(":")[0].upper())
    try:
        with context if context is not None else Context(), device_programs(device, programs):
            Device[device]
    except Exception as e:
        return _reason(e)
    return None


_programs_lock = threading.Lock()


@contextlib.contextmanager
def device_programs(device: str, folder: os.PathLike | None):
    """While tinygrad opens a CPU device, take its four start-up programs (the signal, wait, timestamp
    and worker loops of its command queue) from `folder` where an earlier process compiled them.

    tinygrad 0.14's CPUDevice generates and compiles them in every process, through its full code
    generator: about 0.3-0.4 s of CPU, the largest part of a warm start. Each is kept as its compiled
    ELF (tinygrad's TinyELF, pickled: so only files that you own and that nobody else can write are read,
    as for the graph cache), named by a digest of the program's AST, the renderer's target, the CPU and
    tinygrad's version. ops_cpu.do_to_program is swapped for the length of the opening only, under a lock.
    """
    if folder is None or device.split(":")[0].upper() != "CPU" or tinygrad_version() not in TESTED_TINYGRAD:
        yield
        return
    import tinygrad.runtime.ops_cpu as ops_cpu
    folder = pathlib.Path(folder)
    original = ops_cpu.do_to_program

    def cached(ast, renderer):
        path = folder / f"{_program_digest(ast, renderer)}.elf"
        global _generated
        if (elf := _read_program(path)) is not None:
            return _Compiled(elf)
        _generated += 1
        program = original(ast, renderer)
        _write_program(path, program.to_elf())
        return program

    with _programs_lock:
        ops_cpu.do_to_program = cached
        try:
            yield
        finally:
            ops_cpu.do_to_program = original


class _Compiled:
    """What CPUDevice asks of do_to_program's result: its ELF."""

    def __init__(self, elf):
        self._elf = elf

    def to_elf(self):
        return self._elf


def _program_digest(ast, renderer) -> str:
    from .. import cpu_info
    text = repr((tinygrad_version(), ast.key.hex(), str(renderer.target), cpu_info.model(), sorted(cpu_info.flags())))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read_program(path: pathlib.Path):
    import pickle
    from tinygrad.device import TinyELF
    try:
        data = read_trusted(path)    # a plain file, yours alone, in a folder yours alone
    except OSError:
        return None
    try:
        elf = pickle.loads(data)
    except Exception:    # damaged: generated afresh and rewritten
        return None
    return elf if isinstance(elf, TinyELF) else None


def _write_program(path: pathlib.Path, elf) -> None:
    import pickle
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, lambda f: f.write(pickle.dumps(elf)))
    except OSError:      # a cache that cannot be written (or in a folder others may write): generated again
        pass


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


def tf32_context(enabled: bool):
    """Settings under which tinygrad may run float32 matmuls on TF32 tensor cores (ALLOW_TF32, read when
    a kernel is compiled, and part of tinygrad's own kernel cache key; it acts on CUDA and NV only)."""
    return Context(ALLOW_TF32=1) if enabled else Context()


def codegen(device: str) -> str:
    """The code generator tinygrad uses for `device` now (inside the backend's context): renderer class and
    target (the target names the instruction set a CPU kernel is compiled for), the device's name and
    architecture where tinygrad knows them (GPU binaries are built for one model)."""
    dev = Device[device]
    r = dev.renderer
    what = f"{type(r).__module__}.{type(r).__qualname__}:{getattr(r, 'target', '')}"
    return what + "".join(f":{getattr(dev, a)}" for a in ("device_name", "arch") if isinstance(getattr(dev, a, None), str))


def cpu_threads() -> int:
    """How many threads tinygrad splits a CPU kernel between (NUM_CPU_THREADS: cgroup-aware)."""
    from tinygrad.helpers import NUM_CPU_THREADS
    return int(NUM_CPU_THREADS.value)


def renderer_threads(device: str) -> int:
    """Threads a THREAD opt may split a kernel on `device` between: 1 where the renderer has none."""
    r = Device[device].renderer
    limit = getattr(r, "global_max", None)
    return int(limit[0]) if limit and getattr(r, "has_threads", False) else 1


def synchronize(device: str) -> None:
    """Wait until everything queued on `device` has run (for timing: tinygrad's calls return when queued)."""
    Device[device].synchronize()


def opencl_device_kind(device: str = "CL") -> tuple[str | None, str | None]:
    """(device name, "GPU" / "CPU" / "OTHER") of tinygrad's OpenCL device, asked of the driver
    (clGetDeviceInfo on tinygrad's cl_dev, an internal); (None, None) when it does not open or answer."""
    import ctypes
    _attempted.append(device.split(":")[0].upper())
    try:
        from tinygrad.runtime.autogen import opencl as cl
        dev = Device[device]
        kind = ctypes.c_uint64()
        cl.clGetDeviceInfo(dev.cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
        kinds = [(cl.CL_DEVICE_TYPE_GPU, "GPU"), (cl.CL_DEVICE_TYPE_CPU, "CPU")]
        return dev.device_name, next((name for bit, name in kinds if kind.value & bit), "OTHER")
    except Exception:   # no driver, no device, another tinygrad: the kind is unknown
        return None, None
