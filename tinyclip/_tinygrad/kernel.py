"""The vocabulary tinyclip's hand-written kernels are built with: tinygrad's custom-kernel API.

`Tensor.custom_kernel`, `UOp.range`, `KernelInfo(opts_to_apply=...)` and the Opt types are marked
alpha in tinygrad 0.14; the kernel sets import them from here only, so that a change of tinygrad's
API is met in this file.
"""
from __future__ import annotations

from tinygrad import Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

__all__ = ["AxisType", "KernelInfo", "Ops", "Opt", "OptOps", "UOp", "UPCAST_LIMIT", "dtypes", "run"]

UPCAST_LIMIT = 16    # tinygrad 0.14 refuses to UPCAST one loop by more ("don't upcast more than 16")


def run(size: int, inputs: list[Tensor], fxn) -> Tensor:
    """A new float32 tensor of `size` values written by the custom kernel `fxn(out, *inputs)`."""
    out = Tensor.empty(size, dtype=dtypes.float32, device=inputs[0].device)
    return out.custom_kernel(*inputs, fxn=fxn)[0]
