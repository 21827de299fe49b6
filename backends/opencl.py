"""The OpenCL family: tinygrad's CL device (GPU drivers, or PoCL on a CPU)."""
from __future__ import annotations

import functools
import os

from tinyclip import _tinygrad
from tinyclip.registry import Backend

from . import explain

ACCELERATOR_PRIORITY, CPU_PRIORITY = 50, 5

REASONS = (
    ("failed to load library opencl", "libOpenCL.so not found (Debian: apt-get install ocl-icd-libopencl1 and an "
                                      "OpenCL driver such as pocl-opencl-icd or a GPU's)"),
    ("OpenCL Error -1001", "no OpenCL platform: libOpenCL is there but no driver is registered in "
                           "/etc/OpenCL/vendors (Debian: apt-get install pocl-opencl-icd, or a GPU's OpenCL driver)"),
    ("CL_DEVICE_NOT_FOUND", "the first OpenCL platform has no device (CL_DEVICE_NOT_FOUND)"),
)


class OpenCL(Backend):
    name = "opencl"
    device = "CL"
    dtypes = ("float32", "float16")

    def probe(self) -> str | None:
        return explain(_tinygrad.probe_device(self.device, self.context()), REASONS)

    def probe_key(self) -> str:
        """The installable client drivers (ICD files), the loader's library cache and the environment that
        steers them: what decides whether the device opens and what kind it is."""
        from tinyclip import probes
        vendors = os.environ.get("OCL_ICD_VENDORS", "/etc/OpenCL/vendors")
        return "\n".join((probes.files_key(f"{vendors}/*", "/etc/OpenCL/vendors/*", "/etc/ld.so.cache"),
                          probes.env_key("OCL_ICD", "OPENCL", "POCL", "LD_LIBRARY_PATH", "DEV")))

    def context(self):
        # before the first kernel compiles (the probe's): clang's "1 warning generated." kept off stderr
        if not self._quiet:
            self._quiet = True
            _tinygrad.quiet_opencl_builds(self.device)
        return super().context()

    _quiet = False

    @functools.cached_property
    def priority(self) -> int:  # type: ignore[override]
        # Only an OpenCL device known to be a GPU ranks as an accelerator: one that is really the CPU (PoCL),
        # or one whose kind cannot be read, ranks below the native CPU backends.
        return ACCELERATOR_PRIORITY if self.device_info[1] == "GPU" else CPU_PRIORITY

    @functools.cached_property
    def device_info(self) -> tuple[str | None, str | None]:
        """(device name, "GPU" / "CPU" / "OTHER"), or (None, None) when the device does not open. Remembered
        between processes (probe_key): asking the driver opens it, a third of a second with PoCL."""
        name, kind = self.remembered("device_info", lambda: list(_tinygrad.opencl_device_kind(self.device)))
        return name, kind

    @property
    def description(self) -> str:  # type: ignore[override]
        name, kind = self.device_info if self.available else (None, None)
        return "tinygrad CL device (OpenCL)" + (f": {name}, an OpenCL {kind} device" if kind else "")
