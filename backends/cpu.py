"""The CPU family: tinygrad's CPU device, kernels compiled by clang (default) or by libLLVM."""
from __future__ import annotations

import os
import shutil

from tinygrad.helpers import Context

from tinyclip import _tinygrad
from tinyclip.registry import Backend


class CPU(Backend):
    name = "cpu"
    device = "CPU"
    aliases = ("CPU:CLANG",)
    priority = 10
    dtypes = ("float32", "float16")
    description = "tinygrad CPU device, kernels compiled by clang"
    renderer = "CLANG"
    panel_kernels = True   # tinyclip.kernels: ~15x faster linear layers than tinygrad's default CPU kernels

    def context(self):
        # tinygrad 0.14 picks a device's code generator from its DEV setting at compile time,
        # not from the device string: without this, CPU kernels use whatever DEV says.
        return Context(DEV=f"CPU:{self.renderer}")

    def probe(self) -> str | None:
        """The compiler on PATH and the device opening (which builds tinygrad's own CPU programs,
        or takes them from its kernel cache). No test kernel: where the graph cache holds the
        encoders, a new process then schedules and compiles nothing at all."""
        compiler = os.environ.get("CC", "clang")   # tinygrad runs $CC, default clang
        if shutil.which(compiler) is None:
            hint = "Debian: apt-get install clang" if compiler == "clang" else "unset CC to use clang"
            return f"{compiler} (tinygrad's C compiler, from $CC or clang) is not on PATH ({hint})"
        return _tinygrad.open_device(self.device, self.context())


class CPULLVM(CPU):
    name = "cpu-llvm"
    aliases = ("CPU:LLVM",)
    priority = 9
    description = "tinygrad CPU device, kernels compiled in-process by libLLVM (LLVM >= 15)"
    renderer = "LLVM"

    def probe(self) -> str | None:
        why = _tinygrad.probe_device(self.device, self.context())
        if why and "failed to load library llvm" in why:
            return ("libLLVM not found (Debian: apt-get install libllvm19; tinygrad needs LLVM 15 or newer; "
                    "LLVM_PATH=/path/to/libLLVM.so if it is elsewhere)")
        return why
