"""Kernel sets: how a backend computes CLIP's hot operations.

The model (tinyclip/model.py) never asks which device it is on. Its layers call a KernelSet, which
a backend chooses (`Backend.kernel_set()`):

- `KernelSet` itself (base.py) is the plain tinygrad set: every operation written with Tensor
  methods, which every device runs. OpenCL, CUDA, Metal and raw devices use it.
- `kernels.cpu` is tinyclip's hand-tiled CPU set (x86-64 with AVX2 or AVX-512), chosen by the cpu
  and cpu-llvm backends. It falls back to the plain set where it has nothing better (float16, odd
  widths, another instruction set, an untested tinygrad). Its linear layers also run in bfloat16
  (`KernelSet.with_linear_dtype`, load(dtype="bfloat16")) where the CPU has AVX512_BF16.

A new device's kernels go in a folder of their own here (kernels/cuda/, ...), as a KernelSet
subclass its backend returns; a third-party backend can return its own subclass the same way.
"""
from .activations import ACTIVATIONS, activation
from .base import LINEAR_DTYPES, TINYGRAD, KernelSet

__all__ = ["ACTIVATIONS", "KernelSet", "LINEAR_DTYPES", "TINYGRAD", "activation"]
