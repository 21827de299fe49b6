"""A third-party tinyclip backend, as another package would ship it: tinygrad's CPU device, clang,
with a kernel set of its own (tinyclip's CPU kernels, subclassed: a plugin could override any of
linear, attention, softmax or layer_norm).

Registered by tinyclip_mycpu-1.0.dist-info/entry_points.txt; tests/test_backends.py puts this
folder on a subprocess's sys.path, which is all that installing it would do.
"""
from tinygrad.helpers import Context

from tinyclip.graph_cache import cache_root
from tinyclip.kernels import cpu
from tinyclip.kernels.cpu.isa import choose
from tinyclip.registry import Backend


class MyKernels(cpu.CPUKernels):
    name = "mycpu-kernels"

    def describe(self) -> str:
        return "the mycpu plugin's kernels"


class MyCPU(Backend):
    name = "mycpu"
    device = "CPU"
    dtypes = ("float32",)
    description = "a third-party backend from tinyclip's tests"

    def context(self):
        return Context(DEV="CPU:CLANG")

    def kernel_set(self):
        isa, _ = choose("native")
        return MyKernels(isa, self.device, cache_root() / "cpu") if isa is not None else super().kernel_set()
