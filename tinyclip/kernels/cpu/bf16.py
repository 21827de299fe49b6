"""bfloat16 linear layers on the CPU: AMX tiles or `vdpbf16ps` (AVX512_BF16) on weights stored as bfloat16 pairs.

The rest of the model stays float32 (layer norms, attention and its softmax, the embeddings' sums);
only the linear layers' products take bfloat16 inputs, summed in float32:

- Weights are rounded to bfloat16 once, at load (round to nearest even, as the CPU's own conversion
  does), and stored as panels of P outputs (P = 32, two vectors of 16 float32 lanes; 16 where 32 does
  not divide the outputs) with the reduction in pairs: (out/P, K/2, P, 2), kept as int32 (out/P, K/2, P).
  `vdpbf16ps` multiplies 16 pairs of bfloat16 and adds each pair's two products into one float32 lane,
  so one step of the reduction reads two activations, broadcast as one 32-bit pair, against a 64-byte
  vector of weights. An odd input count is padded with a zero weight; outputs must fill whole vectors
  (`fits`: every CLIP width does; a layer that 16 does not divide keeps its float32 kernel).
- Activations arrive in float32 (the previous layer norm's or attention's output) and are rounded to
  bfloat16 pairs by a conversion kernel of their own (`vcvtne2ps2bf16`, 32 values an instruction), once
  per layer: converting inside the matmul would redo it for every panel.
- The register tile is `machine.tile_rows` rows by the panel's vectors of accumulators while the
  reduction runs. Panels are split between threads by core_id (the conversion's rows likewise,
  Machine.threads_for); a thread takes its panels in groups that fit half of L2, and every row tile
  passes a whole group before the next (the tile's inputs stay in L1 across the group's panels, and
  the input is read once per group, not once per panel).
- Bias, quick_gelu and the residual are applied in the tile's epilogue, in float32.
- Where the CPU has AMX (amx_bf16, amx_tile: Sapphire Rapids and later) and Linux grants the tile state
  (amx()), layers whose inputs are a multiple of 32 run on tiles instead (amx_source): TDPBF16PS takes
  the same pair layout, a tile row of weights being 16 pairs of 16 outputs, and multiplies 16 x 32 inputs
  by 32 x 16 weights into 16 x 16 float32 accumulators, blocks of 32 rows by a panel of 32 outputs at a
  time. On a Sapphire Rapids core a loop of independent vdpbf16ps measured about half the multiply-adds
  a cycle of float32 FMAs, so without AMX bfloat16 gained there only where float32 waits on memory.

The kernels are C source (tinyclip/_tinygrad/source.py), compiled by the CPU device's clang with a
function-level target, so they build whatever -march tinygrad passes; they run only where the CPU has
`avx512_bf16` (CPUKernels refuses bfloat16 elsewhere). Each output is a float32 sum of exact products of
bfloat16 values, in pairs: the error against float32 is bfloat16's rounding of the inputs (8 bits of
mantissa), which README's tolerances bound.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import sys

import numpy as np
from tinygrad import Tensor

from ... import cpu_info
from ...errors import BackendError
from ..._tinygrad import buffers, source
from ..._tinygrad.kernel import dtypes
from .machine import Machine

FLAG = "avx512_bf16"      # the /proc/cpuinfo flag these kernels need
LANES = 16                # float32 lanes of a 512-bit vector: the outputs one vdpbf16ps accumulates
TARGET = '__attribute__((target("avx512bf16,avx512f,avx512vl,avx512bw,avx512dq")))'
AMX_TARGET = '__attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512vl,avx512bw,avx512dq")))'
AMX_ENV = "TINYCLIP_BF16_AMX"   # 0: the vdpbf16ps kernel even where AMX is there (to measure it)
AMX_ROWS = 32                   # rows of a block of AMX accumulators (2 tiles of 16)
AMX_DEPTH = 32                  # inputs one tile step reduces (16 pairs)
L2_SHARE = 2                    # a group of panels fills at most 1/L2_SHARE of L2
# An activation rounded to bfloat16 costs about as long as this many of the matmul's multiply-adds on one
# core (a load, a convert and a store per 32 values, where the matmul does 32 multiply-adds an instruction).
CONVERT_COST = 2


def fits(out_features: int) -> bool:
    """Whether a layer of this many outputs fills whole vectors (the kernel stores no partial vector)."""
    return out_features % LANES == 0


def panel_width(out_features: int) -> int:
    """Outputs per panel: two vectors, or one where two do not divide the outputs."""
    return 2 * LANES if out_features % (2 * LANES) == 0 else LANES


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest even as vcvtne2ps2bf16 does."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_pairs(weight: Tensor) -> Tensor:
    """A linear layer's float32 (out, in) weight as bfloat16 panels of pairs, (out/P, in/2, P) int32 holding two
    bfloat16 bit patterns each (the even input in the low half; an odd last input paired with a zero weight),
    realized on the weight's device. `out` must fit (fits())."""
    out_features, in_features = weight.shape
    if not fits(out_features):
        raise ValueError(f"bf16.to_pairs: {out_features} outputs do not fill vectors of {LANES}")
    P = panel_width(out_features)
    n_panels, pairs = out_features // P, -(-in_features // 2)
    dense = np.zeros((out_features, pairs * 2), np.float32)
    dense[:, :in_features] = buffers.host_array(weight)
    bits = to_bf16_bits(dense).reshape(n_panels, P, pairs, 2).transpose(0, 2, 1, 3)   # (out/P, in/2, P, 2)
    return buffers.from_numpy(np.ascontiguousarray(bits).view(np.int32)[..., 0], weight.device)


def from_pairs(pairs: Tensor) -> np.ndarray:
    """The inverse of to_pairs, as float32 (out, in rounded up to pairs) values: the bfloat16-rounded weight."""
    n_panels, n_pairs, P = pairs.shape
    bits = np.ascontiguousarray(buffers.host_array(pairs)).view(np.uint16).reshape(n_panels, n_pairs, P, 2)
    return from_bf16_bits(bits.transpose(0, 2, 1, 3).reshape(n_panels * P, n_pairs * 2))


def _split(total: int, threads: int, part: str) -> str:
    """C declarations of `start`, `stop`: this thread's share of `total` items (all of them for one thread)."""
    if threads == 1:
        return f"const int {part}_start = 0, {part}_stop = {total};"
    share = -(-total // threads)
    return (f"const int {part}_start = core_id * {share};\n"
            f"  const int {part}_stop = {part}_start + {share} < {total} ? {part}_start + {share} : {total};")


def convert_source(name: str, rows: int, features: int, threads: int, padded_rows: int | None = None) -> str:
    """C for rows x features float32 values into padded_rows (default rows) x ceil(features/2) bfloat16
    pairs (uint32), a row's odd last value paired with zero; rows past the last repeat it (AMX tiles read
    whole blocks of rows)."""
    pairs = -(-features // 2)
    padded_rows = padded_rows or rows
    core = ", int core_id" if threads > 1 else ""
    return f"""#include <immintrin.h>
{TARGET}
void {name}(unsigned int* restrict out, const float* restrict x{core}) {{
  {_split(padded_rows, threads, "row")}
  for (int m = row_start; m < row_stop; m++) {{
    const float* src = x + (long)(m < {rows} ? m : {rows - 1}) * {features};
    unsigned short* dst = (unsigned short*)(out + (long)m * {pairs});
    for (int j = 0; j < {features}; j += 32) {{
      int left = {features} - j;
      __mmask16 lo = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
      __mmask16 hi = left >= 32 ? 0xFFFF : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
      __m512bh b = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, src + j + 16), _mm512_maskz_loadu_ps(lo, src + j));
      int keep = {2 * pairs} - j;     /* bfloat16 values of this row left to write, the pad included */
      __mmask32 mask = keep >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << keep) - 1);
      _mm512_mask_storeu_epi16(dst + j, mask, (__m512i)b);
    }}
  }}
}}
"""


# quick_gelu(y) = y * sigmoid(1.702 y) = y / (1 + 2**t), t = -1.702 y / ln 2, clamped to [-126, 126]; 2**t as
# 2**n * 2**f (n = t rounded, f in [-1/2, 1/2]) with exp.EXP2_TAYLOR's polynomial, as the float32 kernels do.
def _quick_gelu_c() -> str:
    from .exp import EXP2_TAYLOR
    poly = f"_mm512_set1_ps({EXP2_TAYLOR[-1]!r}f)"
    for c in reversed(EXP2_TAYLOR[:-1]):
        poly = f"_mm512_fmadd_ps({poly}, f, _mm512_set1_ps({c!r}f))"
    return f"""static inline {TARGET} __m512 quick_gelu(__m512 y) {{
  __m512 t = _mm512_mul_ps(y, _mm512_set1_ps({-1.702 / math.log(2)!r}f));
  t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
  __m512i n = _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(t, _mm512_set1_ps(128.5f))), _mm512_set1_epi32(128));
  __m512 f = _mm512_sub_ps(t, _mm512_cvtepi32_ps(n));
  __m512 p = {poly};
  __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23)));
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}}
"""


def linear_source(name: str, M: int, N: int, K: int, P: int, rows: int, threads: int, bias: bool,
                  gelu: bool, residual: bool, block: int = 1) -> str:
    """C for out (M, N) float32 = quick_gelu?(x @ W.T + bias) + residual, from x as (M, K/2) bfloat16 pairs
    (convert_source) and W as to_pairs stored it (panels of P outputs)."""
    pairs, vectors, n_panels = -(-K // 2), P // LANES, N // P
    args = ["float* restrict out", "const unsigned int* restrict x", "const unsigned int* restrict w"]
    args += ["const float* restrict bias"] if bias else []
    args += ["const float* restrict res"] if residual else []
    args += ["int core_id"] if threads > 1 else []
    acc = [(r, v) for r in range(rows) for v in range(vectors)]
    declare = "\n".join(f"    __m512 a{r}_{v} = _mm512_setzero_ps();" for r, v in acc)
    row_ptrs = "\n".join(f"    const unsigned int* x{r} = x + (long)(m + {r} < {M} ? m + {r} : {M - 1}) * {pairs};"
                         for r in range(rows))
    weights = "\n".join(f"      __m512bh w{v} = (__m512bh)_mm512_loadu_si512(wk + {v * LANES});"
                        for v in range(vectors))
    products = "\n".join(
        f"      {{ __m512bh b = (__m512bh)_mm512_set1_epi32((int)x{r}[k]);\n" +
        "\n".join(f"        a{r}_{v} = _mm512_dpbf16_ps(a{r}_{v}, b, w{v});" for v in range(vectors)) + " }"
        for r in range(rows))
    stores = []
    for r in range(rows):
        body = []
        for v in range(vectors):
            body.append(f"      {{ const int col = panel * {P} + {v * LANES};\n"
                        f"        __m512 y = a{r}_{v};")
            body += _finish("        ", f"(m + {r})", N, bias, gelu, residual)
            body[-1] += " }"
        stores.append(f"    if (m + {r} < {M}) {{\n" + "\n".join(body) + "\n    }")
    return f"""#include <immintrin.h>
{_quick_gelu_c() if gelu else ""}
{TARGET}
void {name}({", ".join(args)}) {{
  {_split(n_panels, threads, "panel")}
  for (int group = panel_start; group < panel_stop; group += {block}) {{
  for (int m = 0; m < {M}; m += {rows}) {{
  for (int panel = group; panel < group + {block} && panel < panel_stop; panel++) {{
    const unsigned int* wp = w + (long)panel * {pairs * P};
{declare}
{row_ptrs}
    for (int k = 0; k < {pairs}; k++) {{
      const unsigned int* wk = wp + (long)k * {P};
{weights}
{products}
    }}
{chr(10).join(stores)}
  }}
  }}
  }}
}}
"""


def to_pairs_of(x: Tensor, machine: Machine, padded_rows: int | None = None) -> Tensor:
    """float32 x (M, K) as (padded_rows or M, K/2) bfloat16 pairs, int32 (convert_source), split by rows
    between threads."""
    M, K = x.shape
    Mp = padded_rows or M
    threads = min(machine.threads_for(Mp * K, 1 / CONVERT_COST), Mp)
    name = f"tcbf16_convert_{M}_{K}" + (f"_to{Mp}" if Mp != M else "") + (f"_t{threads}" if threads > 1 else "")
    pairs = -(-K // 2)
    return source.run_c(name, convert_source(name, M, K, threads, Mp), Mp * pairs, [x.reshape(-1)], threads=threads,
                        dtype=dtypes.int32).reshape(Mp, pairs)


def _epilogue(tile: str, rows: int, N: int, bias: bool, gelu: bool, residual: bool) -> str:
    """C storing the 16 x 16 float32 block `tile` (a local array) at out[m + r][col + c] for r < rows left."""
    lines = [f"    for (int r = 0; r < 16 && m + r < {rows}; r++) {{",
             f"      __m512 y = _mm512_load_ps({tile} + r * 16);"]
    lines += _finish("      ", "(m + r)", N, bias, gelu, residual) + ["    }"]
    return "\n".join(lines)


def _finish(indent: str, row: str, N: int, bias: bool, gelu: bool, residual: bool) -> list[str]:
    """C lines that add the bias to the vector `y` of outputs col..col+15 of `row`, apply quick_gelu, add the
    residual, and store it."""
    lines = [f"{indent}y = _mm512_add_ps(y, _mm512_loadu_ps(bias + col));"] if bias else []
    lines += [f"{indent}y = quick_gelu(y);"] if gelu else []
    lines += [f"{indent}y = _mm512_add_ps(y, _mm512_loadu_ps(res + (long){row} * {N} + col));"] if residual else []
    return lines + [f"{indent}_mm512_storeu_ps(out + (long){row} * {N} + col, y);"]


def amx_source(name: str, M: int, N: int, K: int, P: int, threads: int, bias: bool, gelu: bool, residual: bool,
               block: int = 1) -> str:
    """C for the same product as linear_source on AMX tiles (TDPBF16PS): blocks of 32 rows x one panel (32
    outputs: 2 x 2 tiles of 16 x 16 float32 accumulators), the reduction 32 inputs a step; x as
    (M rounded up to 32, K/2) pairs, K a multiple of 32, P 32. Panels go in groups of `block` (sized to
    stay in L2) while every row block passes: the input is read once per group, not once per panel. The
    accumulators go through a local block to the same epilogue as the vector kernel's."""
    pairs, n_panels, Mp = K // 2, N // P, -(-M // AMX_ROWS) * AMX_ROWS
    args = ["float* restrict out", "const unsigned int* restrict x", "const unsigned int* restrict w"]
    args += ["const float* restrict bias"] if bias else []
    args += ["const float* restrict res"] if residual else []
    args += ["int core_id"] if threads > 1 else []
    blocks = "\n".join(f"    {{ const int col = panel * {P} + {c * 16}, m = m0 + {r * 16};\n"
                        f"{_epilogue(f'acc[{2 * r + c}]', M, N, bias, gelu, residual)}\n    }}"
                        for r in range(2) for c in range(2))
    return f"""#include <immintrin.h>
{_quick_gelu_c() if gelu else ""}
typedef struct {{
  unsigned char palette, start_row, reserved[14]; unsigned short colsb[16]; unsigned char rows[16];
}} tile_config;
{AMX_TARGET}
void {name}({", ".join(args)}) {{
  {_split(n_panels, threads, "panel")}
  tile_config config = {{0}};
  config.palette = 1;
  for (int t = 0; t < 8; t++) {{ config.rows[t] = 16; config.colsb[t] = 64; }}
  _tile_loadconfig(&config);
  float acc[4][256] __attribute__((aligned(64)));
  for (int group = panel_start; group < panel_stop; group += {block}) {{
  for (int m0 = 0; m0 < {Mp}; m0 += 32) {{
    for (int panel = group; panel < group + {block} && panel < panel_stop; panel++) {{
      const unsigned int* wp = w + (long)panel * {pairs * P};
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int k = 0; k < {pairs}; k += 16) {{
        _tile_loadd(4, x + (long)m0 * {pairs} + k, {pairs * 4});
        _tile_loadd(5, x + (long)(m0 + 16) * {pairs} + k, {pairs * 4});
        _tile_loadd(6, wp + (long)k * {P}, {P * 4});
        _tile_loadd(7, wp + (long)k * {P} + 16, {P * 4});
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
      }}
      _tile_stored(0, acc[0], 64); _tile_stored(1, acc[1], 64);
      _tile_stored(2, acc[2], 64); _tile_stored(3, acc[3], 64);
{blocks}
    }}
  }}
  }}
  _tile_release();
}}
"""


@functools.cache
def amx() -> bool:
    """Whether this process may use AMX tiles for bfloat16 (the CPU's amx_bf16 and amx_tile, Linux's permission
    asked once: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), without which the first tile
    instruction is an illegal one), unless TINYCLIP_BF16_AMX=0."""
    if os.environ.get(AMX_ENV, "1") == "0" or not {"amx_bf16", "amx_tile"} <= cpu_info.flags():
        return False
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1023), ctypes.c_long(18)) == 0   # SYS_arch_prctl
    except (OSError, AttributeError):
        return False


def kind() -> str:
    """Which bfloat16 kernel runs here, for the graph cache key: "amx" or "avx512_bf16"."""
    return "amx" if amx() else FLAG


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool, residual: Tensor | None,
           machine: Machine, use_amx: bool | None = None, convert=None) -> Tensor:
    """quick_gelu?(x @ W.T + bias) + residual in float32 for float32 x (any leading dimensions) and W stored
    by to_pairs, with bfloat16 products summed in float32: on AMX tiles where amx() (or use_amx) says so and
    the shape takes them (inputs a multiple of 32, panels of 32), else with vdpbf16ps. `convert(x2d,
    padded_rows)` gives x's bfloat16 pairs (default: to_pairs_of; a caller whose layers share an input
    converts it once)."""
    convert = convert or (lambda x2d, padded_rows: to_pairs_of(x2d, machine, padded_rows))
    *lead, K = x.shape
    n_panels, pairs, P = weight.shape
    if not source.compiles_c(x.device):     # CPUKernels.linear_dtype_problem refuses this before a model loads
        raise BackendError(f"bfloat16's kernels are C source, which device {x.device}'s compiler does not take")
    if -(-K // 2) != pairs:
        raise ValueError(f"bf16.linear: input has {K} features, weight expects {2 * pairs} (in pairs)")
    M, N = math.prod(lead), n_panels * P
    if residual is not None and residual.shape != (*lead, N):
        raise ValueError(f"bf16.linear: residual has shape {residual.shape}, the output {(*lead, N)}")
    threads = min(machine.threads_for(M * N * K), n_panels)
    epilogue = ("_bias" if bias is not None else "") + ("_gelu" if gelu else "") + \
        ("_res" if residual is not None else "") + (f"_t{threads}" if threads > 1 else "")
    block = max(1, machine.l2 // L2_SHARE // (pairs * P * 4))     # panels a group keeps in L2
    if (use_amx if use_amx is not None else amx()) and K % AMX_DEPTH == 0 and P == 2 * LANES:
        name = f"tcbf16amx_linear_{M}_{N}_{K}_g{block}" + epilogue
        code = amx_source(name, M, N, K, P, threads, bias is not None, gelu, residual is not None, block)
        pairs_in = convert(x.reshape(M, K), -(-M // AMX_ROWS) * AMX_ROWS)
    else:
        rows = min(machine.tile_rows, M)
        name = f"tcbf16_linear_{M}_{N}_{K}_p{P}_r{rows}_g{block}" + epilogue
        code = linear_source(name, M, N, K, P, rows, threads, bias is not None, gelu, residual is not None, block)
        pairs_in = convert(x.reshape(M, K), None)
    inputs = [pairs_in.reshape(-1), weight.reshape(-1)]
    inputs += [bias] if bias is not None else []
    inputs += [residual.reshape(-1)] if residual is not None else []
    return source.run_c(name, code, M * N, inputs, threads=threads, flops=2 * M * N * K).reshape(*lead, N)
