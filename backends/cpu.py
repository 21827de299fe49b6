"""The CPU family: tinygrad's CPU device, kernels compiled by clang (default) or by libLLVM."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import warnings

from tinygrad.helpers import Context

from tinyclip import _tinygrad
from tinyclip.errors import BackendError
from tinyclip.graph_cache import cache_root
from tinyclip.kernels.cpu import CPUKernels, isa as isas
from tinyclip.registry import Backend


class CPU(Backend):
    name = "cpu"
    device = "CPU"
    aliases = ("CPU:CLANG",)
    priority = 10
    dtypes = ("float32", "float16", "bfloat16", "int8")
    description = "tinygrad CPU device, kernels compiled by clang"
    renderer = "CLANG"

    @functools.cached_property
    def _isa(self):
        """(ISA or None, target arch): TINYCLIP_CPU_ISA's choice, read once per backend object."""
        return isas.choose()

    def check_dtype(self, dtype: str | None) -> str:
        """As Backend.check_dtype, and a warning (once per process) that float16 is the slow choice here."""
        name = super().check_dtype(dtype)
        if name == "float16":
            warnings.warn(f"float16 on the {self.name} backend runs several times slower than float32: tinyclip's "
                          "tiled CPU kernels take float32 only, so float16 runs on tinygrad's plain kernels, and the "
                          "CPU converts every value; use float32 (the default) unless you need float16's numbers")
        return name

    def kernel_set(self):
        """tinyclip's tiled CPU kernels for this CPU's instruction set (tinygrad's own where it has none); C
        source kernels (bfloat16's) where the renderer is clang's."""
        isa, _ = self._isa
        if isa is None:
            return super().kernel_set()
        return CPUKernels(isa, self.device, cache_root() / "cpu", c_source=self.renderer == "CLANG")

    def context(self):
        # tinygrad 0.14 picks a device's code generator from its DEV setting at compile time, not from the
        # device string: without this, CPU kernels use whatever DEV says. A forced narrower instruction set
        # also names its target, so that the compiler does not use the wider instructions.
        _, arch = self._isa
        return Context(DEV=f"CPU:{self.renderer}" + (f":{arch}" if arch else ""))

    def probe(self) -> str | None:
        """The instruction-set setting, the compiler tinygrad will run, and the device opening (which builds
        tinygrad's own CPU programs, or takes them from its kernel cache). No test kernel: where the graph
        cache holds the encoders, a new process then schedules and compiles nothing at all."""
        try:
            self._isa
        except BackendError as e:
            return str(e)
        if why := compiler_problem():
            return why
        return _tinygrad.open_device(self.device, self.context(), programs=cache_root() / "cpu" / "programs")


class CPULLVM(CPU):
    name = "cpu-llvm"
    aliases = ("CPU:LLVM",)
    priority = 9
    description = "tinygrad CPU device, kernels compiled in-process by libLLVM (LLVM >= 15)"
    renderer = "LLVM"

    def probe(self) -> str | None:
        try:
            self._isa
        except BackendError as e:
            return str(e)
        if why := compiler_problem():   # tinygrad builds its CPU device's own helper programs with $CC
            return why
        why = _tinygrad.probe_device(self.device, self.context())
        if why and "failed to load library llvm" in why:
            return ("libLLVM not found (Debian: apt-get install libllvm19; tinygrad needs LLVM 15 or newer; "
                    "LLVM_PATH=/path/to/libLLVM.so if it is elsewhere)")
        return why


@functools.cache
def compiler_problem() -> str | None:
    """Why tinygrad's CPU device cannot compile here, in one sentence, or None. tinygrad runs $CC (default
    clang) with clang's own flags (--target=...-none-unknown-elf), which gcc does not take."""
    compiler = os.environ.get("CC", "clang")
    if shutil.which(compiler) is None:
        hint = "Debian: apt-get install clang" if compiler == "clang" else "unset CC to use clang"
        return f"{compiler} (tinygrad's C compiler, from $CC or clang) is not on PATH ({hint})"
    if compiler != "clang":
        try:
            version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as e:
            return f"CC={compiler} does not run ({e}); unset CC to use clang"
        if "clang" not in version.lower():
            return (f"CC={compiler} names a compiler tinygrad's CPU device cannot use (it runs $CC with clang's "
                    f"flags); unset CC, or set CC=clang, for the cpu backends")
    return None
