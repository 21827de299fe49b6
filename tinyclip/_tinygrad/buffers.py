"""Moving arrays between numpy and device buffers without tinygrad's scheduler.

`Tensor(array).realize()` goes through tinygrad's scheduler and a compiled copy, milliseconds each:
for the ~400 weights of a checkpoint and each encoder call's input that was most of the time. These
helpers write host buffers in place, or copy through the device's allocator (tinygrad internals:
Allocator._copyin, Allocator._as_buffer). `Staging` is the host side of an encoder's input: an array
the host fills in place, then uploads (on CUDA from page-locked memory).
"""
from __future__ import annotations

import ctypes
import math

import numpy as np
from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType
from tinygrad.device import canonicalize_device
from tinygrad.uop.ops import Ops, UOp, shape_to_shape_arg

def empty(shape: tuple[int, ...], dtype: DType, device: str) -> Tensor:
    """Tensor.empty(*shape, dtype=dtype, device=device), the same UOps, made directly: tinygrad makes them
    through its movement-op rewrites (a reshape, then a shrink to the same shape), 0.37 ms a tensor, 0.35 s
    of CPU for the ~950 tensors a ViT-B/32 load makes, against 0.14 ms here."""
    shape = tuple(int(n) for n in shape)
    buf = UOp.new_buffer(canonicalize_device(device), math.prod(shape), dtype)
    return Tensor(buf if len(shape) == 1 else UOp(Ops.RESHAPE, dtype, src=(buf, shape_to_shape_arg(shape))))


def gather_rows(table: Tensor, idx: Tensor) -> Tensor:
    """table[idx], gathered in float32 (exact) and cast back: tinygrad 0.14 may lower a float16
    lookup to a one-hot sum over the table whose half accumulator fails to compile on the LLVM
    and OpenCL renderers."""
    return table.float()[idx].cast(table.dtype)


# numpy dtype -> tinygrad dtype, for the arrays tinyclip moves to and from devices itself
NUMPY_DTYPES = {np.dtype(np.float32): dtypes.float32, np.dtype(np.float16): dtypes.float16,
                np.dtype(np.int32): dtypes.int32, np.dtype(np.uint8): dtypes.uint8}
_TO_NUMPY = {v: k for k, v in NUMPY_DTYPES.items()}


def numpy_dtype(dtype: DType) -> np.dtype:
    """The numpy dtype of a tinygrad dtype in NUMPY_DTYPES (float32, float16, int32, uint8)."""
    return _TO_NUMPY[dtype]


def from_numpy(array: np.ndarray, device: str) -> Tensor:
    """A realized tensor holding a copy of a float32, float16, int32 or uint8 array (any strides), in a new
    buffer: written in place in one pass where the buffer is host memory, else copied in by the
    device's allocator. `Tensor(array).realize()` would go through tinygrad's scheduler, and
    Buffer.copy_from through a compiled copy, milliseconds each: for the ~400 weights of a
    checkpoint that was most of a load. (Allocator._copyin is a tinygrad internal.)"""
    dtype = NUMPY_DTYPES[array.dtype]
    t, view = host_tensor(array.shape, dtype, device)
    if view is not None:
        np.copyto(np.frombuffer(view, array.dtype).reshape(array.shape), array)
        return t
    t = empty(array.shape, dtype, device)
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
    t = empty(shape, dtype, device)
    buf = t.uop.buffer.allocate()
    if not hasattr(buf.allocator, "_as_buffer"):
        return None, None
    return t, buf.allocator._as_buffer(buf._buf).cast("B")


def host_array(t: Tensor) -> np.ndarray:
    """The values of a realized tensor as numpy: the tensor's own host buffer, not a copy, where
    it has one and is laid out as `t` (as from_numpy and host_tensor make them; valid while `t`
    lives, and not to be written), else a copy made by t.numpy()."""
    view = _host_view(t)
    return t.numpy() if view is None else np.frombuffer(view, numpy_dtype(t.dtype)).reshape(t.shape)


def _host_view(t: Tensor) -> memoryview | None:
    """The bytes of `t`'s host buffer, where `t` is that whole buffer laid out as it (realized, a plain reshape
    of it at most, a dtype numpy holds, a device whose allocator maps it to host memory); else None."""
    base = t.uop.base
    plain = t.uop is base or (t.uop.op is Ops.RESHAPE and t.uop.src[0] is base)
    if not plain or t.dtype not in _TO_NUMPY or not base.is_realized or (buf := base.buffer).size != t.numel() \
            or buf.offset or not hasattr(buf.allocator, "_as_buffer"):
        return None
    return buf.allocator._as_buffer(buf._buf)


def buffer_of(t: Tensor):
    """What identifies the buffer `t` reads (its base graph node): two tensors with the same one share memory."""
    return t.uop.base


def own_host_array(t: Tensor) -> np.ndarray | None:
    """A writable numpy view of `t`'s whole host buffer, where host_array would give one without a copy;
    else None. For a caller that owns `t` and rewrites its contents in place (then reinterpret() gives
    them their new shape)."""
    view = _host_view(t)
    return None if view is None or view.readonly else np.frombuffer(view, numpy_dtype(t.dtype)).reshape(t.shape)


def reinterpret(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A tensor of `shape` over the same buffer as `t` (a plain host tensor: own_host_array), whose
    contents the caller has rearranged in place: a reshape that tinygrad schedules nothing for."""
    base = buffer_of(t)
    if math.prod(shape) != t.numel():
        raise ValueError(f"reinterpret: {t.shape} holds {t.numel()} values, not the {math.prod(shape)} of {shape}")
    return Tensor(UOp(Ops.RESHAPE, t.dtype, src=(base, shape_to_shape_arg(tuple(int(n) for n in shape)))))


def to_tensor(array: np.ndarray, device: str) -> Tensor:
    """A numpy array onto a device, copied once. float32, float16, int32 and uint8 arrays (the encoders'
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



class Staging:
    """An encoder input's host side: `array`, which the host fills in place, and `upload()`, which
    puts its contents on the device as a realized tensor of the same shape and dtype (the same
    tensor on every call, so a JIT replays on it).

    - CPU devices (CPU, CPU:LLVM): `array` is the device buffer itself; upload() copies nothing.
    - CUDA: `array` is page-locked host memory (cuMemHostAlloc: tinygrad's BufferSpec(host=True)),
      and upload() queues one DMA copy from it on the stream tinygrad's kernels run on, so the
      kernels queued after it read the new contents. tinygrad's own copy-in would first memmove the
      pageable array into a page-locked bounce buffer. NOT RUN on the machines this was written on
      (no GPU): benchmarks/gpu/check.sh exercises it (the cuda tests of tests/test_host_path.py) and
      benchmarks/speed_gpu.py times it.
    - every other device: a numpy array, copied in by the device's allocator on upload().

    A copy that upload() queued may still be reading `array` when it returns: fill the array again
    only after something that waits for the device (reading the encoder's output) has run.
    """

    def __init__(self, shape: tuple[int, ...], dtype, device: str):
        self.shape, self.dtype, self.device = tuple(shape), np.dtype(dtype), device
        tdtype = NUMPY_DTYPES[self.dtype]
        self._host = None                       # the page-locked Buffer behind `array`, on CUDA
        self.tensor, view = host_tensor(self.shape, tdtype, device)
        if view is not None:
            self.kind = "device buffer"
            self.array = np.frombuffer(view, self.dtype).reshape(self.shape)
            self.array[:] = 0                   # (one pass; freshly mapped pages already read as zeros)
            return
        self.tensor = Tensor.empty(*self.shape, dtype=tdtype, device=device)
        self._buf = self.tensor.uop.buffer.allocate() if 0 not in self.shape else None
        if device.split(":")[0] == "CUDA" and self._buf is not None:
            self.kind = "page-locked"
            self.array, self._host = _pinned_array(self.shape, self.dtype, tdtype, device)
            # cleared so that rows a batch leaves unfilled never hold uninitialised memory (a NaN, a
            # denormal that slows the kernels): tinygrad's allocator may hand back a used buffer
            self.array[:] = 0
        else:
            self.kind = "copied"
            self.array = np.zeros(self.shape, self.dtype)

    def upload(self) -> Tensor:
        """The device tensor holding `array`'s contents (a copy queued where it is not host memory)."""
        if self._host is not None:
            _cuda_copyin(self._buf, self._host, self.array.nbytes, self.device)
        elif self.kind == "copied" and self._buf is not None:
            self._buf.allocator._copyin(self._buf._buf, memoryview(self.array.reshape(-1)).cast("B"))
        return self.tensor


def _pinned_array(shape: tuple[int, ...], dtype: np.dtype, tdtype: DType, device: str):
    """(numpy array over page-locked host memory, the tinygrad Buffer that owns it) for a CUDA device.
    tinygrad's CUDAAllocator allocates BufferSpec(host=True) with cuMemHostAlloc (tinygrad internals:
    Buffer(options=...), Buffer._buf, a ctypes.c_void_p there)."""
    from tinygrad.device import Buffer, BufferSpec
    n = int(np.prod(shape))
    host = Buffer(device, max(n, 1), tdtype, options=BufferSpec(host=True)).allocate()
    address = host._buf.value
    raw = (ctypes.c_uint8 * (max(n, 1) * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype, count=n).reshape(shape), host


def _cuda_copyin(dest, host, nbytes: int, device: str) -> None:
    """Queue a copy of `nbytes` from the page-locked `host` Buffer into the device Buffer `dest`, on the
    default stream, where tinygrad 0.14 launches CUDA kernels (CUDAProgram: cuLaunchKernel(..., None, ...))."""
    from tinygrad import Device
    from tinygrad.runtime.autogen import cuda
    from tinygrad.runtime.ops_cuda import check
    if not nbytes:
        return
    check(cuda.cuCtxSetCurrent(Device[device].context))
    check(cuda.cuMemcpyHtoDAsync_v2(dest._buf, host._buf, nbytes, None))
