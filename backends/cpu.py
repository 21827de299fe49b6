"""The CPU family: tinygrad's CPU device, compiled with clang (default) or LLVM."""
from __future__ import annotations

import shutil

from tinygrad.helpers import Context

from tinyclip import _tinygrad
from tinyclip.backend import Backend


class CPU(Backend):
    name = "cpu"
    device = "CPU"
    aliases = ("CPU:CLANG",)
    priority = 10
    dtypes = ("float32", "float16")
    description = "tinygrad CPU device, kernels compiled by clang"
    renderer = "CLANG"
    needs = "clang"

    def context(self):
        # tinygrad 0.14 picks a device's code generator from its DEV setting at compile time.
        return Context(DEV=f"CPU:{self.renderer}")

    def probe(self) -> str | None:
        if self.needs and shutil.which(self.needs) is None:
            return f"{self.needs} is not on PATH (Debian: apt-get install {self.needs})"
        return _tinygrad.probe_device(self.device, self.context())


class CPULLVM(CPU):
    name = "cpu-llvm"
    aliases = ("CPU:LLVM",)
    priority = 9
    description = "tinygrad CPU device, kernels compiled by libLLVM (needs LLVM >= 15 with opaque pointers)"
    renderer = "LLVM"
    needs = ""
