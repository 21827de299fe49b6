"""Attention on the CPU: register-tiled score and value products and a one-kernel softmax."""
from __future__ import annotations

import math

from tinygrad import Tensor

from ..._tinygrad import source
from ..._tinygrad.cpu_runtime import wide_name
from ..._tinygrad.kernel import UPCAST_LIMIT, AxisType, KernelInfo, Ops, Opt, OptOps, UOp, dtypes, run
from ..base import causal_mask
from . import csource, exp, layout
from .machine import Machine

# Speeds against the matmul kernel's, on one core (ratios measured on AVX2; they scale with the machine):
# the head products' short sums (64 terms) run at about a quarter of its multiply-adds per second, and a
# softmax score costs about as long as 80 of its multiply-adds (2 ns against 40 per ns).
PRODUCT_EFFICIENCY = 0.25
SCORE_COST = 80


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool, machine: Machine) -> Tensor:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v per head, for (B, T, C) float32 projections; (B, T, C).

    tinygrad's default kernels run these two products at 3-7 GFLOPS, about 15% of ViT-B/32's
    time. Here both are register-tiled like the matmul, one batch and head per tile:
    - scores: k is copied to (B, heads, d, Tp), positions contiguous and padded to Tp, so a tile
      reads `width` keys as vectors, like a panel; q is read in place (head h at columns h*d..);
      the padded key columns are computed and dropped before the softmax.
    - values: v is read in place, its head's d columns being a panel with a stride of C, and
      the output is written straight into (B, T, C) for out_proj.
    Query rows past the last multiple of the tile read the last row and are not stored."""
    B, T, C = q.shape
    if T == 1:   # one key: its weight is exactly 1 (and a reduction of length 1 is no loop to tile)
        return v
    d = C // heads
    lanes = machine.isa.lanes
    width = lanes if 0 < T % (2 * lanes) <= lanes else 2 * lanes    # key columns per tile: one vector or two
    Tp = -(-T // width) * width
    if source.compiles_c(k.device):
        kt = layout.heads_transposed(k, heads, Tp)
    else:
        kt = k.reshape(B, T, heads, d).permute(0, 2, 3, 1).pad(((0, 0), (0, 0), (0, 0), (0, Tp - T))).contiguous()
    scores = _head_product(
        f"scores_{B}_{heads}_{T}_{d}", q, kt, (B, heads, T, Tp, width, d), B * heads * T * Tp, machine,
        left_at=lambda b, h, i, c: b * (T * C) + i * C + h * d + c,
        right_at=lambda b, h, j, c: (b * heads + h) * (d * Tp) + c * Tp + j,
        out_at=lambda b, h, i, j: (b * heads + h) * (T * Tp) + i * Tp + j, scale=d ** -0.5)
    attn = softmax_rows(scores, B * heads * T, T, Tp, causal, machine)              # (B, heads, T, T)
    value_width = next(w for w in (2 * lanes, lanes, 8, 4, 2, 1) if d % w == 0)
    out = _head_product(
        f"values_{B}_{heads}_{T}_{d}", attn, v, (B, heads, T, d, value_width, T), B * T * C, machine,
        left_at=lambda b, h, i, j: (b * heads + h) * (T * T) + i * T + j,
        right_at=lambda b, h, c, j: b * (T * C) + j * C + h * d + c,
        out_at=lambda b, h, i, c: b * (T * C) + i * C + h * d + c)
    return out.reshape(B, T, C)


def softmax_rows(scores: Tensor, R: int, T: int, Tp: int, causal: bool, machine: Machine) -> Tensor:
    """softmax(scores [+ causal mask]) over the first T of each row of Tp scores (R rows, R a multiple of
    T) in one kernel: x - max, exp, / sum, as tinygrad's Tensor.softmax, but exp by the branch-free
    exp.exp2 (tinygrad's exp2 is some 30 operations with selects: 6 ns a score here against 2), and
    tinygrad's default takes two kernels that add one value at a time. `causal`: row r sees the first
    r % T + 1 scores (the others weigh 0). Rows are tiled by 4 and split between threads. Output (R, T)."""
    threads = machine.threads_for(R * T * SCORE_COST)
    if source.compiles_c(scores.device):     # causal: the C kernel skips the hidden scores, no mask to read
        name = wide_name(machine.isa.lanes, f"softmax_{R}_{T}" + ("_causal" if causal else ""))
        return source.run_c(name, csource.softmax(name, R, T, Tp, threads, causal), R * T,
                            [scores.reshape(-1)], threads)
    mask = causal_mask(T, dtypes.float32, scores.device) if causal else None
    inputs = [scores.reshape(-1)] + ([mask.reshape(-1)] if mask is not None else [])
    name = wide_name(machine.isa.lanes, f"softmax_{R}_{T}")
    rows = 4 if (R // T) % 4 == 0 else 1   # tinygrad splits the row loop into (R/T, T) for the mask

    def kernel(out: UOp, S: UOp, *masks: UOp) -> UOp:
        r = UOp.range(R, 0, AxisType.WEAK)

        def score(j):
            return S[r * Tp + j] + masks[0][(r % T) * T + j] if masks else S[r * Tp + j]

        j = [UOp.range(T, axis, AxisType.REDUCE if axis < 3 else AxisType.WEAK) for axis in (1, 2, 3)]
        top = score(j[0]).reduce(j[0], arg=Ops.MAX, dtype=dtypes.float32)

        def exp_shifted(col):   # exp(score - top) <= 1; 0 below 2**-126 (masked scores, -inf, included)
            t = (score(col) - top) * (1 / math.log(2))
            return exp.exp2(t.maximum(-126.0)) * (t > -126.0).cast(dtypes.float32)

        total = exp_shifted(j[1]).reduce(j[1], arg=Ops.ADD, dtype=dtypes.float32)
        weight = exp_shifted(j[2]) / total
        opts = [Opt(OptOps.UPCAST, 0, rows)] if rows > 1 else []
        if threads > 1 and (R // T // rows) % threads == 0:
            opts.append(Opt(OptOps.THREAD, 0, threads))
        store = out[r * T + j[2]].store(weight).end(r, j[2])
        return store.sink(arg=KernelInfo(name=name, opts_to_apply=tuple(opts)))

    return run(R * T, inputs, kernel)


def _head_product(name: str, left: Tensor, right: Tensor, dims: tuple[int, ...], size: int, machine: Machine,
                  left_at, right_at, out_at, scale: float = 1.0) -> Tensor:
    """out[out_at(b, h, i, n)] = scale * sum_c left[left_at(b, h, i, c)] * right[right_at(b, h, n, c)]
    for dims (B, heads, M, N, width, K): tiles of rows x `width` columns in registers (8 rows where
    `width` is one vector, to keep eight accumulators; else the ISA's matmul tile), batches (else
    heads) split between threads."""
    B, H, M, N, width, K = dims
    rows = 8 if width <= machine.isa.lanes else machine.tile_rows
    Mp = -(-M // rows) * rows
    threads = machine.threads_for(B * H * Mp * N * K, PRODUCT_EFFICIENCY)
    inputs = [left.reshape(-1), right.reshape(-1)]
    if source.compiles_c(left.device):
        name = wide_name(machine.isa.lanes, name)
        code = csource.head_product(name, dims, rows, machine.isa.lanes, threads, left_at, right_at, out_at, scale)
        return source.run_c(name, code, size, inputs, threads, flops=2 * B * H * M * N * K)

    def kernel(out: UOp, lhs: UOp, rhs: UOp) -> UOp:
        b, h, i, n = (UOp.range(extent, axis, AxisType.WEAK) for axis, extent in enumerate((B, H, Mp, N)))
        c = UOp.range(K, 4, AxisType.REDUCE)
        row = i.minimum(M - 1) if Mp != M else i
        acc = (lhs[left_at(b, h, row, c)] * rhs[right_at(b, h, n, c)]).reduce(c, arg=Ops.ADD, dtype=dtypes.float32)
        if scale != 1.0:
            acc = acc * scale
        at = out_at(b, h, i, n)
        store = out[at.valid(i < M) if Mp != M else at].store(acc).end(b, h, i, n)
        return store.sink(arg=KernelInfo(name=wide_name(machine.isa.lanes, name),
                                         opts_to_apply=_head_opts(B, H, Mp, rows, N, width, threads)))

    return run(size, inputs, kernel)


def _head_opts(B: int, H: int, Mp: int, rows: int, N: int, width: int, threads: int) -> tuple[Opt, ...]:
    """Upcast `width` columns and `rows` rows, then thread over batches, else heads."""
    sizes = {"b": B, "h": H, "i": Mp, "n": N}
    loops = [name for name, n in sizes.items() if n > 1]
    opts = []
    if width > 1:   # tinygrad upcasts one loop by at most UPCAST_LIMIT at a time: a wider tile takes two steps
        step = min(width, UPCAST_LIMIT)
        opts.append(Opt(OptOps.UPCAST, loops.index("n"), step))
        if width > step:
            opts.append(Opt(OptOps.UPCAST, loops.index("n"), width // step))
        if N == width:
            loops.remove("n")
    if rows > 1:
        opts.append(Opt(OptOps.UPCAST, loops.index("i"), rows))
        if Mp == rows:
            loops.remove("i")
    for name in ("b", "h"):
        if threads > 1 and name in loops and sizes[name] % threads == 0:
            opts.append(Opt(OptOps.THREAD, loops.index(name), threads))
            break
    return tuple(opts)
