"""The OpenCL family: tinygrad's CL device (GPU drivers, or PoCL on a CPU)."""
from __future__ import annotations

import ctypes
import functools

from tinyclip import _tinygrad
from tinyclip.backend import Backend

ACCELERATOR_PRIORITY, CPU_PRIORITY = 50, 5


class OpenCL(Backend):
    name = "opencl"
    device = "CL"
    dtypes = ("float32", "float16")
    description = "tinygrad CL device (OpenCL)"

    def probe(self) -> str | None:
        why = _tinygrad.probe_device(self.device)
        if why and ("libOpenCL" in why or "OpenCL" in why or "clGetPlatformIDs" in why or "-1001" in why):
            return f"no OpenCL platform ({why}); install an ICD such as pocl-opencl-icd or a GPU driver"
        return why

    @functools.cached_property
    def priority(self) -> int:
        # An OpenCL device that is really the CPU (PoCL) is no accelerator: rank it below the native CPU backend.
        return CPU_PRIORITY if self.device_type() == "CPU" else ACCELERATOR_PRIORITY

    def device_type(self) -> str | None:
        try:
            from tinygrad import Device
            from tinygrad.runtime.autogen import opencl as cl
            dev = Device[self.device]
            kind = ctypes.c_uint64()
            cl.clGetDeviceInfo(dev.cl_dev, cl.CL_DEVICE_TYPE, ctypes.sizeof(kind), ctypes.byref(kind), None)
            return "GPU" if kind.value & cl.CL_DEVICE_TYPE_GPU else "CPU" if kind.value & cl.CL_DEVICE_TYPE_CPU else "OTHER"
        except Exception:
            return None

    @property
    def description(self) -> str:  # type: ignore[override]
        kind = self.device_type() if self.available else None
        return "tinygrad CL device (OpenCL)" + (f", an OpenCL {kind} device" if kind else "")
