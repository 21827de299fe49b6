"""Moving arrays between numpy and device buffers without tinygrad's scheduler.

`Tensor(array).realize()` goes through tinygrad's scheduler and a compiled copy, milliseconds each:
for the ~400 weights of a checkpoint and each encoder call's input that was most of the time. These
helpers write host buffers in place, or copy through the device's allocator (tinygrad internals:
Allocator._copyin, Allocator._as_buffer).
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.uop.ops import Ops

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

