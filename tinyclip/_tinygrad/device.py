"""Devices: dtype names, opening and probing a device, and what it compiles for.

tinygrad opens devices lazily and reports failures as its own exceptions; these helpers turn that
into one-line reasons the backends can show.
"""
from __future__ import annotations

import os
import warnings

from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import Context

from ..trust import untrusted

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


def guard_kernel_cache() -> None:
    """tinygrad reads its kernel cache back with pickle: use it only when the
    current user owns it and nobody else may write to it; otherwise switch the
    cache off (CACHELEVEL=0) for this process, with a warning that says why."""
    from tinygrad import helpers
    path = kernel_cache_path()
    reason = untrusted(path) or untrusted(os.path.dirname(path))
    if reason:
        helpers.CACHELEVEL.value = 0
        warnings.warn(f"tinygrad's kernel cache {path} is not safe to read ({reason}); tinyclip disabled it "
                      "for this process. Remove it or set CACHEDB to a file only you can write.", stacklevel=2)



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


def kernel_cache_path() -> str:
    from tinygrad import helpers
    return helpers.CACHEDB


def synchronize(device: str) -> None:
    """Wait until everything queued on `device` has run (for timing: tinygrad's calls return when queued)."""
    Device[device].synchronize()


def opencl_device_kind(device: str = "CL") -> tuple[str | None, str | None]:
    """(device name, "GPU" / "CPU" / "OTHER") of tinygrad's OpenCL device, asked of the driver
    (clGetDeviceInfo on tinygrad's cl_dev, an internal); (None, None) when it does not open or answer."""
    import ctypes
    try:
        from tinygrad.runtime.autogen import opencl as cl
        dev = Device[device]
        kind = ctypes.c_uint64()
        cl.clGetDeviceInfo(dev.cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
        kinds = [(cl.CL_DEVICE_TYPE_GPU, "GPU"), (cl.CL_DEVICE_TYPE_CPU, "CPU")]
        return dev.device_name, next((name for bit, name in kinds if kind.value & bit), "OTHER")
    except Exception:   # no driver, no device, another tinygrad: the kind is unknown
        return None, None
