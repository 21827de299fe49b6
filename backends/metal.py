"""The Apple family: tinygrad's METAL device."""
from __future__ import annotations

import sys

from tinyclip import _tinygrad
from tinyclip.registry import Backend


class Metal(Backend):
    name = "metal"
    device = "METAL"
    priority = 100
    dtypes = ("float32", "float16")
    description = "tinygrad METAL device (Apple GPUs)"

    def probe(self) -> str | None:
        if sys.platform != "darwin":
            return f"Metal needs macOS (this is {sys.platform})"
        return _tinygrad.probe_device(self.device, self.context())
