"""Layer norm on the CPU in one kernel."""
from __future__ import annotations

import math

from tinygrad import Tensor

from ..._tinygrad import source
from ..._tinygrad.cpu_runtime import wide_name
from ..._tinygrad.kernel import AxisType, KernelInfo, Ops, Opt, OptOps, UOp, dtypes, run
from . import csource
from .machine import Machine

LANE_SUMS = 8      # partial sums per row: enough to hide the add latency, whatever the vector width
# A normalised value costs about as long as this many of the matmul kernel's multiply-adds (1 ns against
# 40 per ns, on AVX2): a ratio of two kernels' speeds on one core, which scales with the machine.
VALUE_COST = 40


def fits(width: int) -> bool:
    """Whether layer_norm takes rows this wide: a multiple of LANE_SUMS of at least two of them."""
    return width % LANE_SUMS == 0 and width >= 2 * LANE_SUMS


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, machine: Machine) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, float32, in one kernel:
    tinygrad's default takes three (mean, variance, output), whose sums add one value at a time
    (each add waits for the last: about 2 GFLOPS). Here each row's mean and variance are sums kept
    in LANE_SUMS partial sums, added together at the end, and rows are split between threads."""
    *lead, C = x.shape
    R = math.prod(lead)
    if not fits(C):
        raise ValueError(f"layer_norm: width {C} is not a multiple of {LANE_SUMS} of at least {2 * LANE_SUMS}")
    lanes = LANE_SUMS
    threads = machine.threads_for(R * C * VALUE_COST)
    name = wide_name(machine.isa.lanes, f"layernorm_{R}_{C}")
    if source.compiles_c(x.device):
        code = csource.layer_norm(name, R, C, lanes, eps, threads)
        return source.run_c(name, code, R * C, [x.reshape(-1), weight, bias], threads).reshape(*lead, C)

    def kernel(out: UOp, X: UOp, W: UOp, Bias: UOp) -> UOp:
        r = UOp.range(R, 0, AxisType.WEAK)

        def row_sum(value, first_axis):   # sum over the row of value(column), in `lanes` partial sums
            lane = UOp.range(lanes, first_axis, AxisType.REDUCE)
            step = UOp.range(C // lanes, first_axis + 1, AxisType.REDUCE)
            return value(step * lanes + lane).reduce(step, arg=Ops.ADD, dtype=dtypes.float32).reduce(
                lane, arg=Ops.ADD, dtype=dtypes.float32)

        mean = row_sum(lambda c: X[r * C + c], 1) * (1.0 / C)
        var = row_sum(lambda c: (X[r * C + c] - mean) * (X[r * C + c] - mean), 3) * (1.0 / C)
        c = UOp.range(C, 5, AxisType.WEAK)
        y = (X[r * C + c] - mean) / (var + eps).sqrt() * W[c] + Bias[c]
        opts = [Opt(OptOps.UNROLL, 0, lanes), Opt(OptOps.UNROLL, 1, lanes),      # the two sums' lanes
                Opt(OptOps.UPCAST, 1 if R > 1 else 0, lanes)]                    # the output's columns
        if threads > 1 and R % threads == 0:
            opts.append(Opt(OptOps.THREAD, 0, threads))
        store = out[r * C + c].store(y).end(r, c)
        return store.sink(arg=KernelInfo(name=name, opts_to_apply=tuple(opts)))

    return run(R * C, [x.reshape(-1), weight, bias], kernel).reshape(*lead, C)
