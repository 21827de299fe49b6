"""The NVIDIA family: tinygrad's CUDA device (driver API + nvrtc) and its NV device (direct ioctls)."""
from __future__ import annotations

import os

from tinyclip import _tinygrad
from tinyclip.registry import Backend

from . import explain, nvidia_key

# What tinygrad's errors mean, in the order they are checked: (text in the error, the reason to give).
CUDA_REASONS = (
    ("failed to load library cuda", "no NVIDIA driver: libcuda.so not found (install the NVIDIA driver, "
                                    "or CUDA_PATH=/path/to/libcuda.so)"),
    ("failed to load library nvrtc", "the NVIDIA driver is there but not nvrtc, CUDA's runtime compiler "
                                     "(install the CUDA toolkit's libnvrtc, or NVRTC_PATH=/path/to/libnvrtc.so)"),
    ("CUDA Error 100", "no NVIDIA GPU visible to the driver (CUDA_ERROR_NO_DEVICE; check CUDA_VISIBLE_DEVICES)"),
    ("CUDA Error 35", "the NVIDIA driver is older than the CUDA runtime (CUDA_ERROR_INSUFFICIENT_DRIVER)"),
)


class CUDA(Backend):
    name = "cuda"
    device = "CUDA"
    priority = 100
    dtypes = ("float32", "float16")
    description = "tinygrad CUDA device (NVIDIA driver and nvrtc)"
    tf32 = True

    def probe(self) -> str | None:
        return explain(_tinygrad.probe_device(self.device, self.context()), CUDA_REASONS)

    def probe_key(self) -> str:
        return nvidia_key()


class NV(Backend):
    name = "nv"
    device = "NV"
    priority = 101   # tinygrad's own preference: its NV runtime launches kernels with less overhead than CUDA's
    dtypes = ("float32", "float16")
    description = "tinygrad NV device (NVIDIA GPU through the kernel driver directly, no libcuda)"
    tf32 = True

    def probe(self) -> str | None:
        why = _tinygrad.probe_device(self.device, self.context())
        if why and not os.path.exists("/dev/nvidiactl"):
            return "no NVIDIA kernel driver (/dev/nvidiactl does not exist) and no NVIDIA GPU on PCI for tinygrad"
        return explain(why, NV_REASONS)

    def probe_key(self) -> str:
        # tinygrad's NV device imports its driver bindings before it finds no GPU: 0.3 s of a process
        return nvidia_key()


# tinygrad 0.14's NV runtime picks the GPU's usermode, channel, compute and copy classes with next() over the
# classes it drives (runtime/ops_nv.py, setup_usermode): a GPU offering none of one kind surfaces as a bare
# StopIteration. It drives Turing to Blackwell classes but not Hopper's compute class (seen on an H200).
NV_REASONS = (
    ("StopIteration", "tinygrad's NV device opened the NVIDIA driver but does not drive this GPU (a StopIteration "
                      "while it chose the GPU's channel and compute classes: tinygrad 0.14 knows Turing, Ampere, "
                      "Ada and Blackwell classes, not Hopper's, such as an H100's or H200's); use the cuda backend"),
)
