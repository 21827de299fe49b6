"""A third-party tinyclip backend, as another package would ship it: tinygrad's CPU device, clang.

Registered by tinyclip_mycpu-1.0.dist-info/entry_points.txt; tests/test_backends.py puts this
folder on a subprocess's sys.path, which is all that installing it would do.
"""
from tinygrad.helpers import Context

from tinyclip.registry import Backend


class MyCPU(Backend):
    name = "mycpu"
    device = "CPU"
    dtypes = ("float32",)
    description = "a third-party backend from tinyclip's tests"
    panel_kernels = True   # opts into tinyclip's CPU matmul, as the built-in cpu backend does

    def context(self):
        return Context(DEV="CPU:CLANG")
