"""The NVIDIA family: tinygrad's CUDA device (driver API + nvrtc) and its NV device (direct ioctls)."""
from __future__ import annotations

from tinyclip import _tinygrad
from tinyclip.backend import Backend


class CUDA(Backend):
    name = "cuda"
    device = "CUDA"
    priority = 100
    dtypes = ("float32", "float16")
    description = "tinygrad CUDA device (NVIDIA driver and nvrtc)"

    def probe(self) -> str | None:
        why = _tinygrad.probe_device(self.device)
        if why and ("libcuda" in why or "cuInit" in why or "nvrtc" in why or "CUDA" in why):
            return f"no usable NVIDIA CUDA driver ({why})"
        return why


class NV(CUDA):
    name = "nv"
    device = "NV"
    priority = 101
    description = "tinygrad NV device (NVIDIA GPU through the kernel driver directly)"
