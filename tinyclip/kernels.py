"""Hand-chosen kernels for the CPU's hot matrix products.

Profiling ViT-B/32 (benchmarks/kernel_profile.py) puts about 89% of the image
tower's time in its linear layers, and tinygrad 0.14's default CPU kernel for
`x @ W.T` runs them at 3-5 GFLOPS. Five things matter:

- Layout. With W as (out, in) or (in, out), a register tile of P outputs walks
  P rows of W, or one row 12 KB apart per step of the reduction: every step
  touches new cache lines and pages. Stored as panels, (out/P, in, P), the P
  weights one step needs are contiguous and a panel is read front to back.
- Tiling. The default heuristic upcasts a 4x3 tile and unrolls the
  reduction; here the kernel keeps a 4-row x 16-column tile of accumulators in
  registers (UPCAST: eight 8-lane vectors, which with the operands fit the 16
  vector registers of AVX2), and splits panels between the CPU threads (THREAD).
- Vector width. tinygrad's C and LLVM renderers group float loads into vectors
  of at most 4 lanes, so every FMA would be 128 bits wide: half of AVX2. For
  kernels named panel_*, tinyclip/_tinygrad.py groups them into 8 lanes.
- Threads. tinygrad 0.14 runs the THREAD parts of a CPU kernel one after the
  other on one core; tinyclip/_tinygrad.py runs them at the same time.
- Loop order. With few rows (batch 1) each row tile would sweep the whole
  weight from memory; those loop over panels outside rows instead.

Measured on the 1600x768 @ 768x3072 product of ViT-B/32 at batch 32 (float32,
this 2-core AVX2 machine): default kernel about 5 GFLOPS; panels with 4-lane
vectors and 4x8 tiles 32-38; 8-lane vectors and 4x16 tiles 60-77 on one core;
on both cores about 100 (torch: about 100-120; the machine's FMA peak is about
165). At batch 1 (50 rows) the panels-outside order takes 35 to 55 GFLOPS on one core.

The attention products (`attention`) use the same tiles, per batch and head.

The kernel is written with tinygrad's UOp custom-kernel API
(`Tensor.custom_kernel`, `UOp.range`, `KernelInfo(opts_to_apply=...)`), which
tinygrad marks alpha; this module is the only user of it.
"""
from __future__ import annotations

import math

from tinygrad import Device, Tensor, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo, Ops, UOp

from . import _tinygrad

PANELS = (16, 8)   # output columns per panel, widest first: 16 is two 8-lane vectors per row
ROWS = 4           # output rows per register tile
PANELS_OUTER_BYTES = 1 << 20   # inputs up to this size: loop over panels outside rows (see panel_linear)
THREAD_MIN_US = 200            # kernels shorter than this on one core run on one thread (see _threads)

_tinygrad.use_wide_vectors()       # 8-lane float vectors for the panel_* kernels on CPU renderers
_tinygrad.use_parallel_threads()   # THREAD-split CPU kernels run on as many cores (tinygrad runs them on one)


def panel_width(out_features: int) -> int | None:
    """The widest panel that divides this many outputs, None when none does."""
    return next((width for width in PANELS if out_features % width == 0), None)


def to_panels(weight: Tensor, width: int) -> Tensor:
    """A linear layer's (out, in) weight as contiguous panels (out/width, in, width), realized.
    Rearranged by numpy in one strided copy from the weight's host buffer into the new one: a
    tinygrad kernel per layer would cost a schedule each at load time."""
    out_features, in_features = weight.shape
    rows = _tinygrad.host_array(weight).reshape(out_features // width, width, in_features)
    return _tinygrad.from_numpy(rows.transpose(0, 2, 1), weight.device)


# 2**f for f in [-1/2, 1/2]: the Taylor series of exp(f ln 2) to f**7 (relative error < 1e-8).
EXP2_TAYLOR = tuple(math.log(2) ** k / math.factorial(k) for k in range(8))


def quick_gelu(x):
    """x * sigmoid(1.702 x), CLIP's activation, for the panel kernel's epilogue (x a UOp there).

    tinygrad's own exp2 rounds with a select on the sign of its argument, which clang compiles
    to a branch once vectorized: with signs at random it mispredicts half the time (about 9 ns a
    value against 1.3). Here exp(-1.702 x) = 2**t, t clamped to [-126, 126] (beyond, sigmoid is 0
    or 1 to float32 precision), is split as 2**n * 2**f with n = t rounded half up (truncating a
    positive number: no select) and f = t - n in [-1/2, 1/2], 2**f by EXP2_TAYLOR and 2**n built
    in the exponent bits."""
    return x / (1.0 + _exp2((x * (-1.702 / math.log(2))).maximum(-126.0).minimum(126.0)))


def _exp2(t):
    """2**t for t in [-126, 126] without a select (see quick_gelu)."""
    n = (t + 128.5).cast(dtypes.int32) - 128
    f = t - n.cast(dtypes.float32)
    p = EXP2_TAYLOR[-1]
    for c in reversed(EXP2_TAYLOR[:-1]):
        p = p * f + c
    return p * ((n + 127) << 23).bitcast(dtypes.float32)


def panel_linear(x: Tensor, panels: Tensor, bias: Tensor | None, act=None, residual: Tensor | None = None) -> Tensor:
    """act(x @ W.T + bias) + residual for W stored by to_panels; float32, any leading dimensions.
    `act`, an elementwise function written with tinygrad's shared Tensor/UOp methods
    (model.activation), and the residual (a tensor shaped like the output: a transformer's skip
    connection) are applied to each output in registers before it is stored.

    The row loop runs to a multiple of ROWS, so the register tile always fits: rows past the last
    read the last row and are not stored (no padded copy of the input, no slice of the output).
    Each output is one float32 sum over the inputs in order (tinygrad's default kernel sums in
    another order: float32 rounding apart)."""
    *lead, K = x.shape
    n_panels, K2, P = panels.shape
    if K != K2:
        raise ValueError(f"panel_linear: input has {K} features, weight expects {K2}")
    M, N = math.prod(lead), n_panels * P
    if residual is not None and residual.shape != (*lead, N):
        raise ValueError(f"panel_linear: residual has shape {residual.shape}, the output {(*lead, N)}")
    rows = ROWS if M > 1 else 1   # one row: no tile of rows (its loop would fold away)
    Mp = -(-M // rows) * rows
    # A few rows (batch 1) sweep the weight once per row tile, from memory: then the loop over
    # panels goes outside, so each panel stays in cache while every row tile uses it. Many rows do
    # better the other way round, their tile's inputs staying in cache while the panels stream past.
    order = ("panels", "rows") if Mp * K * 4 <= PANELS_OUTER_BYTES else ("rows", "panels")
    opts = _opts(order, Mp // rows, rows, n_panels, P, _threads(x.device, M * N * K / 40e3))   # ~40 GMAC/s a core
    name = f"panel_linear_{Mp}_{N}_{K}" + ("_bias" if bias is not None else "") + ("_act" if act else "") + \
        ("_res" if residual is not None else "")

    def kernel(C: UOp, A: UOp, B: UOp, *extra: UOp) -> UOp:
        m = UOp.range(Mp, order.index("rows"), AxisType.WEAK)
        panel = UOp.range(n_panels, order.index("panels"), AxisType.WEAK)
        col = UOp.range(P, 2, AxisType.WEAK)
        k = UOp.range(K, 3, AxisType.REDUCE)
        row = m.minimum(M - 1) if Mp != M else m
        acc = (A[row * K + k] * B[panel * (K * P) + k * P + col]).reduce(k, arg=Ops.ADD, dtype=dtypes.float32)
        if bias is not None:
            acc = acc + extra[0][panel * P + col]
        if act is not None:
            acc = act(acc)
        if residual is not None:
            acc = acc + extra[-1][row * N + panel * P + col]
        at = m * N + panel * P + col
        store = C[at.valid(m < M) if Mp != M else at].store(acc).end(m, panel, col)
        return store.sink(arg=KernelInfo(name=name, opts_to_apply=opts))

    out = Tensor.empty(M * N, dtype=dtypes.float32, device=x.device)
    inputs = [x.reshape(-1), panels.reshape(-1)] + ([bias] if bias is not None else []) + \
        ([residual.reshape(-1)] if residual is not None else [])
    return out.custom_kernel(*inputs, fxn=kernel)[0].reshape(*lead, N)


def _opts(order: tuple[str, str], row_tiles: int, rows: int, n_panels: int, width: int,
          threads: int) -> tuple[Opt, ...]:
    """Upcast the panel's columns and `rows` rows into registers, then split row tiles or panels
    between threads. Opt axes count the kernel's loops of size > 1, in order (`order`, then
    columns), and a loop that an upcast uses up entirely drops out of that count."""
    sizes = {"rows": row_tiles * rows, "panels": n_panels, "cols": width}
    loops = [name for name in (*order, "cols") if sizes[name] > 1]
    opts = [Opt(OptOps.UPCAST, loops.index("cols"), 0)]
    loops.remove("cols")
    if rows > 1:
        opts.append(Opt(OptOps.UPCAST, loops.index("rows"), rows))
        if row_tiles == 1:
            loops.remove("rows")
    if threads > 1:
        if n_panels % threads == 0 and "panels" in loops:
            opts.append(Opt(OptOps.THREAD, loops.index("panels"), threads))
        elif row_tiles % threads == 0 and "rows" in loops:
            opts.append(Opt(OptOps.THREAD, loops.index("rows"), threads))
    return tuple(opts)


def _threads(device: str, microseconds: float = math.inf) -> int:
    """Threads to split a kernel between: the CPU's, unless the kernel would take under
    THREAD_MIN_US on one core, where waking a helper thread (about 100 us on this VM) costs more
    than it saves."""
    limit = getattr(Device[device].renderer, "global_max", None)
    if microseconds < THREAD_MIN_US or not (limit and getattr(Device[device].renderer, "has_threads", False)):
        return 1
    return int(limit[0])


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (16, 24, 32, ... long), float32,
    in one kernel: tinygrad's default takes three (mean, variance, output), whose sums add one value
    at a time (each add waits for the last: about 2 GFLOPS). Here each row's mean and variance are
    sums kept in eight lanes, added together at the end, and rows are split between threads."""
    *lead, C = x.shape
    R = math.prod(lead)
    lanes = 8
    if C % lanes or C < 2 * lanes:
        raise ValueError(f"layer_norm: width {C} is not a multiple of {lanes} of at least {2 * lanes}")

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
        if (threads := _threads(x.device, R * C / 1e3)) > 1 and R % threads == 0:   # ~1 ns a value
            opts.append(Opt(OptOps.THREAD, 0, threads))
        store = out[r * C + c].store(y).end(r, c)
        return store.sink(arg=KernelInfo(name=f"panel_layernorm_{R}_{C}", opts_to_apply=tuple(opts)))

    out = Tensor.empty(R * C, dtype=dtypes.float32, device=x.device)
    return out.custom_kernel(x.reshape(-1), weight, bias, fxn=kernel)[0].reshape(*lead, C)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v per head, for (B, T, C) float32 projections; (B, T, C).

    tinygrad's default kernels run these two products at 3-7 GFLOPS, about 15% of ViT-B/32's
    time. Here both are register-tiled like panel_linear, one batch and head per tile:
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
    width = 8 if 0 < T % 16 <= 8 else 16
    Tp = -(-T // width) * width
    kt = k.reshape(B, T, heads, d).permute(0, 2, 3, 1).pad(((0, 0), (0, 0), (0, 0), (0, Tp - T))).contiguous()
    scores = _head_product(
        f"panel_scores_{B}_{heads}_{T}_{d}", q, kt, (B, heads, T, Tp, width, d), B * heads * T * Tp,
        left_at=lambda b, h, i, c: b * (T * C) + i * C + h * d + c,
        right_at=lambda b, h, j, c: (b * heads + h) * (d * Tp) + c * Tp + j,
        out_at=lambda b, h, i, j: (b * heads + h) * (T * Tp) + i * Tp + j, scale=d ** -0.5)
    attn = _softmax_rows(scores, B * heads * T, T, Tp, mask)                      # (B, heads, T, T)
    value_width = next(w for w in (16, 8, 4, 2, 1) if d % w == 0)
    out = _head_product(
        f"panel_values_{B}_{heads}_{T}_{d}", attn, v, (B, heads, T, d, value_width, T), B * T * C,
        left_at=lambda b, h, i, j: (b * heads + h) * (T * T) + i * T + j,
        right_at=lambda b, h, c, j: b * (T * C) + j * C + h * d + c,
        out_at=lambda b, h, i, c: b * (T * C) + i * C + h * d + c)
    return out.reshape(B, T, C)


def _softmax_rows(scores: Tensor, R: int, T: int, Tp: int, mask: Tensor | None) -> Tensor:
    """softmax(scores + mask) over the first T of each row of Tp scores (R rows, R a multiple of T)
    in one kernel: x - max, exp, / sum, as tinygrad's Tensor.softmax, but exp by the branch-free
    _exp2 (tinygrad's exp2 is some 30 operations with selects: 6 ns a score here against 2), and
    tinygrad's default takes two kernels that add one value at a time. `mask` is additive, (T, T)
    after leading ones (row r uses mask row r % T). Rows are tiled by 4 and split between threads.
    Output (R, T)."""
    if mask is not None and (mask.shape[-2:] != (T, T) or math.prod(mask.shape[:-2]) != 1):
        raise ValueError(f"attention: the mask must be ({T}, {T}) after leading ones, got {mask.shape}")
    rows = 4 if (R // T) % 4 == 0 else 1   # tinygrad splits the row loop into (R/T, T) for the mask

    def kernel(out: UOp, S: UOp, *masks: UOp) -> UOp:
        r = UOp.range(R, 0, AxisType.WEAK)

        def score(j):
            return S[r * Tp + j] + masks[0][(r % T) * T + j] if masks else S[r * Tp + j]

        j = [UOp.range(T, axis, AxisType.REDUCE if axis < 3 else AxisType.WEAK) for axis in (1, 2, 3)]
        top = score(j[0]).reduce(j[0], arg=Ops.MAX, dtype=dtypes.float32)

        def exp(col):   # exp(score - top) <= 1; 0 below 2**-126 (masked scores, -inf, included)
            t = (score(col) - top) * (1 / math.log(2))
            return _exp2(t.maximum(-126.0)) * (t > -126.0).cast(dtypes.float32)

        total = exp(j[1]).reduce(j[1], arg=Ops.ADD, dtype=dtypes.float32)
        weight = exp(j[2]) / total
        opts = [Opt(OptOps.UPCAST, 0, rows)] if rows > 1 else []
        if (threads := _threads(scores.device, R * T * 2e-3)) > 1 and (R // T // rows) % threads == 0:   # ~2 ns a score
            opts.append(Opt(OptOps.THREAD, 0, threads))
        store = out[r * T + j[2]].store(weight).end(r, j[2])
        return store.sink(arg=KernelInfo(name=f"panel_softmax_{R}_{T}", opts_to_apply=tuple(opts)))

    result = Tensor.empty(R * T, dtype=dtypes.float32, device=scores.device)
    inputs = [scores.reshape(-1)] + ([mask.reshape(-1).cast(dtypes.float32)] if mask is not None else [])
    return result.custom_kernel(*inputs, fxn=kernel)[0]


def _head_product(name: str, left: Tensor, right: Tensor, dims: tuple[int, ...], size: int,
                  left_at, right_at, out_at, scale: float = 1.0) -> Tensor:
    """out[out_at(b, h, i, n)] = scale * sum_c left[left_at(b, h, i, c)] * right[right_at(b, h, n, c)]
    for dims (B, heads, M, N, width, K): tiles of ROWS rows (8 when `width` is 8, to keep eight
    accumulators) by `width` columns in registers, batches (else heads) split between threads."""
    B, H, M, N, width, K = dims
    rows = 8 if width == 8 else ROWS
    Mp = -(-M // rows) * rows

    def kernel(out: UOp, lhs: UOp, rhs: UOp) -> UOp:
        b, h, i, n = (UOp.range(extent, axis, AxisType.WEAK) for axis, extent in enumerate((B, H, Mp, N)))
        c = UOp.range(K, 4, AxisType.REDUCE)
        row = i.minimum(M - 1) if Mp != M else i
        acc = (lhs[left_at(b, h, row, c)] * rhs[right_at(b, h, n, c)]).reduce(c, arg=Ops.ADD, dtype=dtypes.float32)
        if scale != 1.0:
            acc = acc * scale
        at = out_at(b, h, i, n)
        store = out[at.valid(i < M) if Mp != M else at].store(acc).end(b, h, i, n)
        return store.sink(arg=KernelInfo(name=name, opts_to_apply=_head_opts(B, H, Mp, rows, N, width, K, left.device)))

    result = Tensor.empty(size, dtype=dtypes.float32, device=left.device)
    return result.custom_kernel(left.reshape(-1), right.reshape(-1), fxn=kernel)[0]


def _head_opts(B: int, H: int, Mp: int, rows: int, N: int, width: int, K: int, device: str) -> tuple[Opt, ...]:
    """Like _opts: upcast `width` columns and `rows` rows, then thread over batches, else heads."""
    sizes = {"b": B, "h": H, "i": Mp, "n": N}
    loops = [name for name, n in sizes.items() if n > 1]
    opts = []
    if width > 1:
        opts.append(Opt(OptOps.UPCAST, loops.index("n"), width))
        if N == width:
            loops.remove("n")
    if rows > 1:
        opts.append(Opt(OptOps.UPCAST, loops.index("i"), rows))
        if Mp == rows:
            loops.remove("i")
    threads = _threads(device, B * H * Mp * N * K / 10e3)   # ~10 GMAC/s a core at these short sums
    for name in ("b", "h"):
        if threads > 1 and name in loops and sizes[name] % threads == 0:
            opts.append(Opt(OptOps.THREAD, loops.index(name), threads))
            break
    return tuple(opts)
