"""The linear layers on the CPU: weights stored as panels, a register-tiled, cache-blocked kernel.

Profiling ViT-B/32 puts about 89% of the image tower's time in its linear layers, which tinygrad
0.14's default CPU kernel runs at 3-5 GFLOPS. What this kernel does instead:

- Layout. With W as (out, in), a register tile of P outputs walks P rows of W, kilobytes apart per
  step of the reduction. Stored as panels, (out/P, in, P), the P weights one step needs are
  contiguous and a panel is read front to back. P is two vectors (16 floats on AVX2, 32 on
  AVX-512), or one where two do not divide the outputs.
- Register tile. `machine.tile_rows` rows x P columns of accumulators stay in registers while the
  reduction runs (UPCAST): of the ISA's candidates (4 or 6 rows x 2 vectors in AVX2's 16 registers,
  4 to 8 in AVX-512's 32), the one that measured fastest on this machine (tuning.py).
- Vector width. tinygrad groups float loads into 4-lane vectors; tinyclip's pass
  (_tinygrad/cpu_runtime.py) groups this kernel's into the ISA's lanes (kernels named tc<lanes>_).
- Loop order. Inputs that fit half this core's L2 loop over panels outside rows: each panel is read
  once and used by every row tile from cache (batch 1). Larger inputs take the order that measured
  faster on this machine (tuning.py): panels outside (a panel stays in L2 while the rows stream
  past), or row tiles outside (a tile's inputs stay in L1 while the panels stream past). On a 2-core
  Zen 4 the first ran fc1 at 74-93 GFLOPS a core against 55-61 for the second and for blocks of
  rows sized to L2; the AVX2 VM the kernels were first tuned on preferred the second.
- Threads. Panels (else row blocks) are split between the CPU threads (THREAD); tinygrad 0.14 runs
  those parts one after another, tinyclip's runtime patch on several cores. Kernels too short to
  win back a thread hand-off stay on one thread (Machine.threads_for).

Each output is one float32 sum over the inputs in order (tinygrad's default kernel sums in another
order: float32 rounding apart).
"""
from __future__ import annotations

import math
import os
import threading

import numpy as np
from tinygrad import Tensor

from ..._tinygrad import buffers, source
from ..._tinygrad.cpu_runtime import wide_name
from ..._tinygrad.kernel import UPCAST_LIMIT, AxisType, KernelInfo, Ops, Opt, OptOps, UOp, dtypes, run
from . import csource, exp
from .machine import Machine

L2_SHARE = 2     # an input filling at most 1/L2_SHARE of L2 stays in cache: panels loop outside rows
# An activated value costs about as long as this many of the matmul kernel's multiply-adds on one core (quick_gelu's
# exp2 is some 20 vector operations where the matmul does a multiply-add on a vector): Machine.threads_for's ratio.
ACTIVATION_COST = 2


def panel_width(out_features: int, lanes: int) -> int | None:
    """The widest panel (two vectors, else one) that divides this many outputs, None when none does."""
    return next((width for width in (2 * lanes, lanes) if out_features % width == 0), None)


def to_panels(weight: Tensor, width: int, reuse: bool = False) -> Tensor:
    """A linear layer's (out, in) weight as contiguous panels (out/width, in, width), realized.
    Rearranged by numpy in one strided copy from the weight's host buffer into a new one (a tinygrad
    kernel per layer would cost a schedule each at load time). `reuse`: the caller gives `weight` up,
    and where its buffer is host memory the panels are rearranged in that buffer (each panel occupies
    the same bytes in both layouts, so it is copied out and written back transposed): no new buffer,
    whose first touch of every page cost more than the copy itself (a ViT-B/32 tower: 350 MB)."""
    out_features, in_features = weight.shape
    shape = (out_features // width, in_features, width)
    if reuse and (own := buffers.own_host_array(weight)) is not None:
        _panels_in_place(own.reshape(shape[0], width * in_features), width, in_features)
        return buffers.reinterpret(weight, shape)
    rows = buffers.host_array(weight).reshape(out_features // width, width, in_features)
    return buffers.from_numpy(rows.transpose(0, 2, 1), weight.device)


PANEL_CHUNK_BYTES = 1 << 19   # panels rewritten a chunk at a time: the chunk and its copy stay in L2 (512 KB and up)


def _panels_in_place(rows: np.ndarray, width: int, in_features: int) -> None:
    """rows (panels, width * in): each row, a panel of `width` weight rows, rewritten as its transpose
    (in, width). Up to two threads share the panels (numpy copies release the GIL; the copies are bound by
    memory, which more threads do not widen)."""
    n = rows.shape[0]
    chunk = max(1, PANEL_CHUNK_BYTES // (rows.itemsize * width * in_features))

    def part(lo: int, hi: int) -> None:
        scratch = np.empty((chunk, width, in_features), rows.dtype)
        for p in range(lo, hi, chunk):
            c = min(chunk, hi - p)
            np.copyto(scratch[:c], rows[p:p + c].reshape(c, width, in_features))
            np.copyto(rows[p:p + c].reshape(c, in_features, width), scratch[:c].transpose(0, 2, 1))

    if n < 4 * chunk or len(os.sched_getaffinity(0)) < 2:
        part(0, n)
        return
    helper = threading.Thread(target=part, args=(n // 2, n))
    helper.start()
    try:
        part(0, n // 2)
    finally:
        helper.join()


def from_panels(panels: Tensor) -> Tensor:
    """The inverse of to_panels: (out, in)."""
    n_panels, fan_in, width = panels.shape
    return panels.permute(0, 2, 1).reshape(n_panels * width, fan_in)


def panel_linear(x: Tensor, panels: Tensor, bias: Tensor | None, act, residual: Tensor | None,
                 machine: Machine) -> Tensor:
    """act(x @ W.T + bias) + residual for W stored by to_panels; float32, any leading dimensions.
    The residual (a tensor shaped like the output: a transformer's skip connection) is added in
    registers before the store. `act` (an elementwise function on UOps, like exp.quick_gelu) runs in a
    kernel of its own over the output (`activation`): in the tile's epilogue it is unrolled for every
    accumulator (8 rows x 32 columns on AVX-512), and tinygrad took four times as long to generate that
    kernel's code as the matmul's alone (3.6 against 0.9 s for ViT-B/32's text fc1 on the Zen 4 VM), the
    largest part of a new user's compile wait, where the extra pass over the output costs about 2% of
    the layer. Rows past the last read the last row and are not stored (no padded copy of the input)."""
    if act is not None:
        return activation(panel_linear(x, panels, bias, None, None, machine), act, residual, machine)
    *lead, K = x.shape
    n_panels, K2, P = panels.shape
    if K != K2:
        raise ValueError(f"panel_linear: input has {K} features, weight expects {K2}")
    M, N = math.prod(lead), n_panels * P
    if residual is not None and residual.shape != (*lead, N):
        raise ValueError(f"panel_linear: residual has shape {residual.shape}, the output {(*lead, N)}")
    rows = min(machine.tile_rows, M)
    Mp = -(-M // rows) * rows
    threads = machine.threads_for(M * N * K)
    rows_outer = machine.rows_outer and Mp * K * 4 > machine.l2 // L2_SHARE
    extents = {"rows": Mp, "panels": n_panels} if rows_outer else {"panels": n_panels, "rows": Mp}
    extents["cols"] = P
    opts = _tile_opts(extents, rows, threads)
    name = wide_name(machine.isa.lanes, f"linear_{Mp}_{N}_{K}") + ("_bias" if bias is not None else "") + \
        ("_res" if residual is not None else "")
    inputs = [x.reshape(-1), panels.reshape(-1)] + ([bias] if bias is not None else []) + \
        ([residual.reshape(-1)] if residual is not None else [])
    if source.compiles_c(x.device):
        code = csource.linear(name, M, N, K, P, machine.isa.lanes, rows, rows_outer, threads, bias is not None,
                              residual is not None)
        return source.run_c(name, code, M * N, inputs, threads, flops=2 * M * N * K).reshape(*lead, N)

    def kernel(C: UOp, A: UOp, B: UOp, *extra: UOp) -> UOp:
        m, panel, col = (UOp.range(extents[loop], list(extents).index(loop), AxisType.WEAK)
                         for loop in ("rows", "panels", "cols"))
        k = UOp.range(K, 3, AxisType.REDUCE)
        row = m.minimum(M - 1) if Mp != M else m
        acc = (A[row * K + k] * B[panel * (K * P) + k * P + col]).reduce(k, arg=Ops.ADD, dtype=dtypes.float32)
        if bias is not None:
            acc = acc + extra[0][panel * P + col]
        if residual is not None:
            acc = acc + extra[-1][row * N + panel * P + col]
        at = m * N + panel * P + col
        store = C[at.valid(m < M) if Mp != M else at].store(acc).end(m, panel, col)
        return store.sink(arg=KernelInfo(name=name, opts_to_apply=opts))

    return run(M * N, inputs, kernel).reshape(*lead, N)


def activation(y: Tensor, act, residual: Tensor | None, machine: Machine) -> Tensor:
    """act(y) + residual, elementwise, float32, in one kernel of the ISA's vectors split between threads."""
    total = y.numel()
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"activation: residual has shape {residual.shape}, the output {y.shape}")
    lanes = machine.isa.lanes
    if total % lanes:
        raise ValueError(f"activation: {total} values are not a multiple of {lanes} lanes")
    threads = machine.threads_for(total * ACTIVATION_COST)
    opts = [Opt(OptOps.UPCAST, 0, lanes)]
    if threads > 1 and (total // lanes) % threads == 0:
        opts.append(Opt(OptOps.THREAD, 0, threads))
    name = wide_name(lanes, f"act_{total}") + ("_res" if residual is not None else "")
    inputs = [y.reshape(-1)] + ([residual.reshape(-1)] if residual is not None else [])
    if source.compiles_c(y.device) and act is exp.quick_gelu:
        code = csource.activation(name, total, lanes, threads, residual is not None)
        return source.run_c(name, code, total, inputs, threads).reshape(y.shape)

    def kernel(out: UOp, Y: UOp, *extra: UOp) -> UOp:
        i = UOp.range(total, 0, AxisType.WEAK)
        value = act(Y[i])
        if residual is not None:
            value = value + extra[0][i]
        return out[i].store(value).end(i).sink(arg=KernelInfo(name=name, opts_to_apply=tuple(opts)))

    return run(total, inputs, kernel).reshape(y.shape)


def _tile_opts(extents: dict[str, int], rows: int, threads: int) -> tuple[Opt, ...]:
    """Upcast the panel's columns and `rows` rows into registers, then split panels (else row tiles)
    between threads. Opt axes count the kernel's loops of extent > 1, in order, and a loop that an
    upcast uses up entirely drops out of that count."""
    loops = [name for name, n in extents.items() if n > 1]
    # All of a panel's columns: tinygrad upcasts one loop by at most UPCAST_LIMIT at a time, so a wider
    # panel takes two steps on the same loop (the second upcasts what the first left).
    step = min(extents["cols"], UPCAST_LIMIT)
    opts = [Opt(OptOps.UPCAST, loops.index("cols"), step)]
    if extents["cols"] > step:
        opts.append(Opt(OptOps.UPCAST, loops.index("cols"), 0))
    loops.remove("cols")
    if rows > 1:
        opts.append(Opt(OptOps.UPCAST, loops.index("rows"), rows))
        if extents["rows"] == rows:
            loops.remove("rows")
    if threads > 1:
        for name, extent in (("panels", extents["panels"]), ("rows", extents["rows"] // rows)):
            if name in loops and extent % threads == 0:
                opts.append(Opt(OptOps.THREAD, loops.index(name), threads))
                break
    return tuple(opts)
