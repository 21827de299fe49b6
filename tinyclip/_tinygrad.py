"""Every tinygrad-specific workaround in one place.

tinygrad moves fast (setup.cfg pins the tested range); what tinyclip relies
on beyond plain Tensor operations is wrapped here, so an upgrade touches one
file.
"""
from __future__ import annotations

import os
import stat
import warnings

import numpy as np
from tinygrad import Device, Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.helpers import Context

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
        # CACHELEVEL=0: compile for real, so a cached binary cannot hide a missing compiler.
        with context if context is not None else Context(), Context(CACHELEVEL=0):
            got = (Tensor([1.0, 2.0, 3.0], device=device) * 2).tolist()
    except Exception as e:
        return _reason(e)
    return None if got == [2.0, 4.0, 6.0] else f"wrong result {got} from a test kernel"


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


def bf16_bits_to_float32(bits: Tensor) -> Tensor:
    """bfloat16 values given as their raw 16 bits -> float32. clang's C target has no __bf16, so
    tinygrad cannot cast bfloat16 on the CPU; the 16 bits at the top of a float32 are exact
    everywhere."""
    return (bits.cast(dtypes.uint32) * 65536).bitcast(dtypes.float32)


def to_tensor(array: np.ndarray, device: str) -> Tensor:
    """A numpy array onto a device (copied once; tinygrad may keep a view otherwise)."""
    return Tensor(np.ascontiguousarray(array), device=device)


def as_float32(t: Tensor) -> np.ndarray:
    """Realize `t` (inside the caller's backend context) as a float32 numpy array."""
    return (t.float() if t.dtype != dtypes.float32 else t).numpy()


def guard_kernel_cache() -> None:
    """tinygrad reads its kernel cache back with pickle: use it only when the
    current user owns it and nobody else may write to it; otherwise switch the
    cache off (CACHELEVEL=0) for this process, with a warning that says why."""
    from tinygrad import helpers
    path = helpers.CACHEDB
    reason = _untrusted(path) or _untrusted(os.path.dirname(path))
    if reason:
        helpers.CACHELEVEL.value = 0
        warnings.warn(f"tinygrad's kernel cache {path} is not safe to read ({reason}); tinyclip disabled it "
                      "for this process. Remove it or set CACHEDB to a file only you can write.", stacklevel=2)


def _untrusted(path: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot stat: {e}"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{path} is owned by uid {st.st_uid}, not by you"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by group or others"
    return None
