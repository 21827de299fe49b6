"""Linear layers in int8 on the CPU: VNNI dot products, written as C source (_tinygrad/source.py).

What is quantised and how (symmetric, no zero points):
- Weights, once at load, per output channel: scale_n = max_k |W[n, k]| / 127, q = rint(W / scale_n)
  in [-127, 127]. Stored with the kernel's layout (`quantise`): panels of P output channels,
  groups of 4 along the reduction, (N/P, K/4, P, 4) int8 (a last, narrower panel where P does not
  divide N, zero-padded to whole vectors; K zero-padded to a multiple of 4), then the float32
  scales, then corr_n = 128 * sum_k q[n, k] as int32, then K as an int32, all in one uint8 tensor
  of shape (N, row_bytes) (row_bytes = those bytes over N, rounded up: the shape carries N).
- Activations, per row, inside the graph (`quantise_rows`, a kernel of its own): scale_m =
  max_k |x[m, k]| / 127, q = rint(x * (127 / max)) + 128 as uint8 (K padded with 128, a zero), then
  the M float32 scales.

`vpdpbusd` multiplies unsigned bytes by signed ones, four at a time, into int32 lanes: with the
activations shifted by +128, acc = sum_k (q_x + 128) q_w = sum_k q_x q_w + corr_n, so the linear
layer is y = float(acc - corr_n) * (scale_m * scale_n) + bias_n, then the activation (quick_gelu
and relu in the kernel, the others in tinygrad after it), then + residual: exact integer sums, one
float32 rescale. A register tile of `rows` rows x `vectors` vectors of int32 accumulators (P =
vectors x lanes outputs) walks the reduction 4 bytes at a time: per step, `vectors` weight loads,
`rows` broadcasts of 4 activation bytes, rows x vectors dot products. Panels are split between
threads by core_id (Machine.threads_for); each thread sweeps its panels outside the row tiles, so a
panel (K*P bytes) stays in L1/L2 while the rows stream past.

Where each path runs (`PATHS`, data, like isa.py): AVX512_VNNI (`_mm512_dpbusd_epi32`, 16 int32
lanes) beside the avx512 float kernels, AVX-VNNI (`_mm256_dpbusd_avx_epi32`, 8 lanes) beside the
avx2 ones. The functions carry their own target attribute, so they compile whatever -march tinygrad
passes (a forced narrower ISA compiles for its own target).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ... import cpu_info
from ..._tinygrad import source
from ..._tinygrad.kernel import dtypes
from .isa import ISA

GROUP = 4           # bytes of the reduction one dot-product lane takes: the weights' innermost axis
QMAX = 127          # symmetric: -127..127, so that -q is representable and 0 is exact
FORMAT = 1          # of the quantised weights (the store's key: a new layout never reads an old file)
# An int8 multiply-add costs about this fraction of a float32 one in the tiled float kernel (64 int8 lanes per
# vpdpbusd against 16 float32 per FMA, less the quantisation): Machine.threads_for's efficiency.
SPEEDUP = 3.0
ACTS_IN_KERNEL = ("quick_gelu", "relu")    # other activations run in tinygrad after the kernel


@dataclasses.dataclass(frozen=True)
class Path:
    name: str                 # the /proc/cpuinfo flag of the dot product; also the path's name
    float_isa: str            # the float32 ISA (isa.py) it runs beside
    needs: tuple[str, ...]    # /proc/cpuinfo flags, all required
    lanes: int                # int32 lanes per vector
    rows: int                 # rows of the register tile
    vectors: int              # vectors of outputs in the register tile: a panel is vectors x lanes wide
    target: str               # clang target attribute of the kernels' functions
    vector_type: str          # the intrinsics' integer vector type
    dot: str                  # the unsigned x signed byte dot product into int32 lanes
    fmax: str                 # float max and min of two vectors
    fmin: str

    @property
    def panel(self) -> int:
        return self.vectors * self.lanes

    def key(self) -> dict:
        """What shapes the weights' layout and the kernels' code."""
        return {"path": self.name, "lanes": self.lanes, "rows": self.rows, "vectors": self.vectors,
                "format": FORMAT}


# 32 zmm registers: 6 x 4 accumulators, 4 weight vectors, a broadcast. 16 ymm: 6 x 2, 2, 1.
PATHS = (
    Path("avx512_vnni", "avx512", ("avx512_vnni", "avx512bw", "avx512vl", "avx512f"), lanes=16, rows=6, vectors=4,
         target="avx512f,avx512bw,avx512vl,avx512vnni,fma", vector_type="__m512i", dot="_mm512_dpbusd_epi32",
         fmax="_mm512_max_ps", fmin="_mm512_min_ps"),
    Path("avx_vnni", "avx2", ("avx_vnni", "avx2", "fma"), lanes=8, rows=6, vectors=2,
         target="avx2,fma,avxvnni", vector_type="__m256i", dot="_mm256_dpbusd_avx_epi32",
         fmax="_mm256_max_ps", fmin="_mm256_min_ps"),
)


def choose(isa: ISA, flags: frozenset[str] | None = None) -> Path | str:
    """The int8 path for the float32 instruction set `isa` on this CPU, or, where there is none, one
    sentence naming the missing flag."""
    flags = cpu_info.flags() if flags is None else flags
    for path in PATHS:
        if path.float_isa == isa.name and set(path.needs) <= flags:
            return path
    wanted = [p for p in PATHS if p.float_isa == isa.name]
    if not wanted:
        return f"dtype int8 has no kernels for the {isa.name} instruction set"
    missing = [f for f in wanted[0].needs if f not in flags]
    return (f"dtype int8 needs the CPU flag {', '.join(missing)} (VNNI int8 dot products) for tinyclip's "
            f"{isa.name} kernels, and this CPU does not have it")


# ---- the weights' layout (numpy, at load) ---------------------------------------------------------

def padded_inputs(k: int) -> int:
    return -(-k // GROUP) * GROUP


def padded_outputs(n: int, path: Path) -> int:
    """Outputs stored: whole panels, then the last one's columns rounded up to whole vectors."""
    return -(-n // path.lanes) * path.lanes


def quantise(weight: np.ndarray, path: Path) -> np.ndarray:
    """A linear layer's float32 weight (N, K) as the kernel reads it: uint8 (N, row_bytes)."""
    n, k = weight.shape
    kp, np_ = padded_inputs(k), padded_outputs(n, path)
    w = np.asarray(weight, np.float32)
    top = np.abs(w).max(axis=1)
    inv = np.divide(np.float32(QMAX), top, out=np.zeros_like(top), where=top > 0)
    q = np.zeros((np_, kp), np.int8)
    q[:n, :k] = np.clip(np.rint(w * inv[:, None]), -QMAX, QMAX)
    scales = np.zeros(np_, np.float32)
    scales[:n] = top / np.float32(QMAX)
    corr = 128 * q.sum(axis=1, dtype=np.int32)
    P, full = path.panel, n // path.panel
    body = q[:full * P].reshape(full, P, kp // GROUP, GROUP).transpose(0, 2, 1, 3)      # (N/P, K/4, P, 4)
    tail = q[full * P:].reshape(np_ - full * P, kp // GROUP, GROUP).transpose(1, 0, 2)  # (K/4, Tp, 4)
    data = b"".join([np.ascontiguousarray(body).tobytes(), np.ascontiguousarray(tail).tobytes(),
                     scales.tobytes(), corr.astype("<i4").tobytes(), np.array([k], "<i4").tobytes()])
    row = -(-len(data) // n)
    out = np.zeros(n * row, np.uint8)
    out[:len(data)] = np.frombuffer(data, np.uint8)
    return out.reshape(n, row)


def inputs_of(packed: np.ndarray, path: Path) -> int:
    """K, as `quantise` recorded it after the corrections."""
    np_ = padded_outputs(packed.shape[0], path)
    flat = packed.reshape(-1)
    for kp in range(GROUP, flat.size // np_ + 1, GROUP):     # the one K/4 whose layout fills this shape
        at = np_ * kp + 8 * np_
        if stored_shape(packed.shape[0], kp, path) == packed.shape:
            return int(flat[at:at + 4].view("<i4")[0])
    raise ValueError(f"a quantised weight of shape {packed.shape} does not have {path.name}'s layout")


def unpack(packed: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(q (N, K) int8, scales (N,) float32) of a weight `quantise` made."""
    n, k = packed.shape[0], inputs_of(packed, path)
    kp, np_ = padded_inputs(k), padded_outputs(n, path)
    flat = packed.reshape(-1)
    P, full = path.panel, n // path.panel
    body = flat[:full * P * kp].view(np.int8).reshape(full, kp // GROUP, P, GROUP).transpose(0, 2, 1, 3)
    tail = flat[full * P * kp:np_ * kp].view(np.int8).reshape(kp // GROUP, np_ - full * P, GROUP).transpose(1, 0, 2)
    q = np.concatenate([body.reshape(full * P, kp), tail.reshape(np_ - full * P, kp)])[:n, :k]
    scales = flat[np_ * kp:np_ * kp + 4 * np_].view("<f4")[:n]
    return q, scales.astype(np.float32)


def dequantise(packed: np.ndarray, path: Path) -> np.ndarray:
    """The float32 (N, K) weight the int8 one stands for: q * scale."""
    q, scales = unpack(packed, path)
    return q.astype(np.float32) * scales[:, None]


def stored_shape(n: int, k: int, path: Path) -> tuple[int, int]:
    np_ = padded_outputs(n, path)
    return n, -(-(np_ * padded_inputs(k) + 8 * np_ + 4) // n)


# ---- the kernels (C source) -----------------------------------------------------------------------

def quantise_rows_source(name: str, m: int, k: int, threads: int) -> str:
    """x float32 (M, K) -> M rows of KP bytes (q + 128), then M float32 scales. The maximum is taken on
    the bits of |x| (for non-negative floats their order as integers): an integer max, which clang
    vectorizes without fast-math."""
    kp = padded_inputs(k)
    core = ", int core_id" if threads > 1 else ""
    r0, r1 = ("core_id * M / T", "(core_id + 1) * M / T") if threads > 1 else ("0", "M")
    return f"""#define M {m}
#define K {k}
#define KP {kp}
#define T {threads}
void {name}(unsigned char* restrict out, const float* restrict x{core}) {{
  float* scales = (float*)(out + (unsigned long)M * KP);
  for (int r = {r0}; r < {r1}; r++) {{
    const float* xr = x + (unsigned long)r * K;
    const unsigned int* bits = (const unsigned int*)xr;
    unsigned int top = 0;
    for (int k = 0; k < K; k++) {{ unsigned int b = bits[k] & 0x7fffffffu; top = b > top ? b : top; }}
    float amax;
    __builtin_memcpy(&amax, &top, 4);
    float inv = amax > 0.0f ? {QMAX}.0f / amax : 0.0f;
    unsigned char* o = out + (unsigned long)r * KP;
    for (int k = 0; k < K; k++) {{
      float q = __builtin_rintf(xr[k] * inv);
      q = q > {QMAX}.0f ? {QMAX}.0f : q;
      q = q < -{QMAX}.0f ? -{QMAX}.0f : q;
      o[k] = (unsigned char)((int)q + 128);
    }}
    for (int k = K; k < KP; k++) o[k] = 128;
    scales[r] = amax / {QMAX}.0f;
  }}
}}
"""


# 2**f for f in [-1/2, 1/2] (exp.py's series): quick_gelu's exp without a libm call or a branch.
_EXP2 = ", ".join(f"{c!r}f" for c in (math.log(2) ** i / math.factorial(i) for i in range(8)))


def linear_source(name: str, m: int, n: int, k: int, path: Path, threads: int, bias: bool, act: str | None,
                  residual: bool) -> str:
    """out float32 (M, N) = act(float(acc - corr) * (scale_x * scale_w) + bias) + residual."""
    kp, np_ = padded_inputs(k), padded_outputs(n, path)
    L, R, V, P = path.lanes, path.rows, path.vectors, path.panel
    full = n // P
    tail_vectors = (np_ - full * P) // L
    panels = full + (1 if tail_vectors else 0)
    args = ["float* restrict out", "const unsigned char* restrict xq", "const unsigned char* restrict wq"]
    args += ["const float* restrict bias"] * bias + ["const float* restrict res"] * residual
    call_args = "out, xq, w, xs, ws, wc" + (", bias" if bias else "") + (", res" if residual else "")
    params = ("float* restrict out, const unsigned char* restrict xq, const signed char* restrict w, "
              "const float* restrict xs, const float* restrict ws, const int* restrict wc"
              + (", const float* restrict bias" if bias else "") + (", const float* restrict res" if residual else ""))
    core = ", int core_id" if threads > 1 else ""
    p0, p1 = ("core_id * PANELS / T", "(core_id + 1) * PANELS / T") if threads > 1 else ("0", "PANELS")
    act_code = {None: "", "relu": f"y = {path.fmax}(y, (vf){{}});",
                "quick_gelu": "y = quick_gelu(y);"}[act if act in ACTS_IN_KERNEL else None]
    attrs = f'__attribute__((always_inline, target("{path.target}")))'

    def panel(fn: str, vectors: int, stride: int) -> str:
        """A panel of `vectors` vectors (`stride` bytes per group of 4 along K) against every row tile."""
        return f"""static inline {attrs} void {fn}(int col, {params}) {{
  const signed char* wp = w + (unsigned long)col * KP;
  for (int m0 = 0; m0 < M; m0 += R) {{
    const unsigned char* a[R];
    for (int r = 0; r < R; r++) a[r] = xq + (unsigned long)(m0 + r < M ? m0 + r : M - 1) * KP;
    vi acc[R][{vectors}];
    for (int r = 0; r < R; r++) for (int v = 0; v < {vectors}; v++) acc[r][v] = (vi){{}};
    for (int g = 0; g < KP / 4; g++) {{
      vi wv[{vectors}];
      for (int v = 0; v < {vectors}; v++) wv[v] = *(const vu*)(wp + (unsigned long)g * {stride} + v * L * 4);
      for (int r = 0; r < R; r++) {{
        int four;
        __builtin_memcpy(&four, a[r] + g * 4, 4);
        vi av = (vi){{}} + four;
        for (int v = 0; v < {vectors}; v++) acc[r][v] = (vi){path.dot}(({path.vector_type})acc[r][v], ({path.vector_type})av, ({path.vector_type})wv[v]);
      }}
    }}
    for (int r = 0; r < R && m0 + r < M; r++) {{
      int row = m0 + r;
      for (int v = 0; v < {vectors}; v++) {{
        int c = col + v * L;
        vf s = *(const vfu*)(ws + c);
        s = s * xs[row];
        vf y = __builtin_convertvector(acc[r][v] - *(const vu*)(wc + c), vf);
        y = y * s;
        {"y = y + load_part(bias + c, N - c);" if bias else ""}
        {act_code}
        {"y = y + load_part(res + (unsigned long)row * N + c, N - c);" if residual else ""}
        store_part(out + (unsigned long)row * N + c, y, N - c);
      }}
    }}
  }}
}}
"""
    return f"""#include <immintrin.h>
#pragma STDC FP_CONTRACT OFF
#define M {m}
#define N {n}
#define KP {kp}
#define NP {np_}
#define L {L}
#define R {R}
#define T {threads}
#define PANELS {panels}
typedef int vi __attribute__((vector_size({4 * L})));
typedef float vf __attribute__((vector_size({4 * L})));
typedef int vu __attribute__((vector_size({4 * L}), aligned(1)));
typedef float vfu __attribute__((vector_size({4 * L}), aligned(1)));

static inline {attrs} vf load_part(const float* p, int left) {{
  if (left >= L) return *(const vfu*)p;
  vf y = {{}};
  for (int i = 0; i < left; i++) y[i] = p[i];
  return y;
}}
static inline {attrs} void store_part(float* p, vf y, int left) {{
  if (left >= L) {{ *(vfu*)p = y; return; }}
  for (int i = 0; i < left; i++) p[i] = y[i];
}}
static inline {attrs} vf quick_gelu(vf y) {{
  const float c[8] = {{{_EXP2}}};
  vf t = y * {-1.702 / math.log(2)!r}f;
  t = {path.fmin}({path.fmax}(t, (vf){{}} - 126.0f), (vf){{}} + 126.0f);
  vi e = __builtin_convertvector(t + 128.5f, vi) - 128;
  vf f = t - __builtin_convertvector(e, vf);
  vf p = (vf){{}} + c[7];
  for (int i = 6; i >= 0; i--) p = p * f + c[i];
  vf two = (vf)((e + 127) << 23);
  return y / (1.0f + p * two);
}}
{panel("panel_full", V, P * 4)}
{panel("panel_tail", tail_vectors, tail_vectors * L * 4) if tail_vectors else ""}
__attribute__((target("{path.target}"))) void {name}({", ".join(args)}{core}) {{
  const signed char* w = (const signed char*)wq;
  const float* xs = (const float*)(xq + (unsigned long)M * KP);
  const float* ws = (const float*)(wq + (unsigned long)NP * KP);
  const int* wc = (const int*)(wq + (unsigned long)NP * KP + 4ul * NP);
  for (int p = {p0}; p < {p1}; p++) {{
    if (p < {full}) panel_full(p * {P}, {call_args});
    {f"else panel_tail(p * {P}, {call_args});" if tail_vectors else ""}
  }}
}}
"""


def quantised_rows(x, machine):
    """x's rows (float32, any leading dimensions) quantised for linear(): one kernel; a uint8 tensor."""
    *lead, k = x.shape
    m, kp = math.prod(lead), padded_inputs(k)
    qthreads = machine.threads_for(m * k, efficiency=1 / 8)    # a few operations a value, not a multiply-add
    qname = f"i8_rows_{m}_{k}_t{qthreads}"
    return source.run_c(qname, quantise_rows_source(qname, m, k, qthreads), m * kp + 4 * m, [x.reshape(-1)],
                        threads=qthreads, dtype=dtypes.uint8)


def linear(x, packed, bias, act: str | None, residual, path: Path, machine, xq=None):
    """act(x @ W.T + bias) + residual for W quantised by `quantise` (the uint8 tensor `packed`), x float32 with
    any leading dimensions: the rows quantised by one kernel (or `xq`, quantised_rows(x) already made: q, k
    and v share theirs), the int8 matmul in another. An activation the kernel does not compute
    (ACTS_IN_KERNEL) runs after it in tinygrad, then the residual."""
    from ..activations import activation
    *lead, k = x.shape
    n = packed.shape[0]
    if packed.shape != stored_shape(n, k, path):
        raise ValueError(f"int8 linear: input has {k} features, the quantised weight {packed.shape} does not fit them")
    m = math.prod(lead)
    if residual is not None and residual.shape != (*lead, n):
        raise ValueError(f"int8 linear: residual has shape {residual.shape}, the output {(*lead, n)}")
    if xq is None:
        xq = quantised_rows(x, machine)
    fused = act in ACTS_IN_KERNEL or act is None
    late_residual = residual is not None and not fused
    threads = max(1, min(machine.threads_for(m * n * k, efficiency=SPEEDUP), -(-n // path.panel)))
    name = (f"i8_linear_{m}_{n}_{k}_{path.name}_{path.rows}x{path.vectors}_t{threads}" + ("_bias" if bias is not None else "")
            + (f"_{act}" if fused and act else "") + ("_res" if residual is not None and not late_residual else ""))
    inputs = [xq, packed.reshape(-1)] + ([bias] if bias is not None else []) + \
        ([residual.reshape(-1)] if residual is not None and not late_residual else [])
    src = linear_source(name, m, n, k, path, threads, bias is not None, act if fused else None,
                        residual is not None and not late_residual)
    y = source.run_c(name, src, m * n, inputs, threads=threads, flops=2 * m * n * k).reshape(*lead, n)
    if not fused:
        y = activation(act)(y)
    return y + residual if late_residual else y
