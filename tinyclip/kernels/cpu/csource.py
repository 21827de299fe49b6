"""The CPU kernels as C source, for devices that compile C with clang (_tinygrad/source.py).

Each function here returns the text of one C function that computes what its namesake in matmul.py,
attention.py or norm.py builds out of UOps, with the same tiles, the same threads and each sum in the
same order (a sum over k in order, multiply and add contracted into an FMA as clang does in both): the
linear layers give the same numbers bit for bit (a test checks); quick_gelu, the softmax and layer norm
can differ from the UOp forms by a float32 rounding or two (clang contracts a few of their steps
differently), both well within the oracle's bounds. tinygrad needs about a second of
CPU to turn an unrolled tile written in UOps into C; written here, the text costs microseconds and
clang compiles it in a few hundredths of a second. The UOp forms stay for CPU:LLVM, whose compiler
takes LLVM IR.

Vectors are clang's ext_vector_type of the ISA's float32 lanes: `vf` in registers, `vfu` for loads
and stores at any float's alignment (clang emits unaligned moves, as fast on aligned data).
"""
from __future__ import annotations

import math

from .exp import EXP2_TAYLOR

LN2 = math.log(2)


def _header(lanes: int) -> str:
    return (f"typedef float vf __attribute__((ext_vector_type({lanes})));\n"
            f"typedef float vfu __attribute__((ext_vector_type({lanes}), aligned(4)));\n")


def _signature(name: str, buffers: list[str], threads: int, lanes: int = 1) -> str:
    """The function's first line. clang's tuning for Intel's AVX-512 CPUs (-march=native: skylake-avx512 to
    sapphirerapids) prefers 256-bit vectors and splits a 16-lane vector type into two 256-bit halves: a tile of
    8 x 2 vectors became 32 accumulators that spilled to the stack (fc1 at 150 GFLOPS on the Xeon where torch
    ran 305). min_vector_width makes the kernel's own vectors (lanes x 32 bits) legal, so they stay whole.
    A buffer is a name (float) or "C-type name" (e.g. "int ids"); each is const and restrict."""
    typed = [b.rsplit(" ", 1) if " " in b else ("float", b) for b in buffers]
    args = ["float* restrict out"] + [f"const {kind}* restrict {b}" for kind, b in typed]
    width = f"__attribute__((min_vector_width({32 * lanes}))) " if lanes > 1 else ""
    return f"{width}void {name}({', '.join(args + (['int core_id'] if threads > 1 else []))})"


def _share(count: int, threads: int, var: str) -> str:
    """C lines setting {var}0 and {var}1 to this thread's part of range(count) (all of it for 1 thread)."""
    if threads <= 1:
        return f"  const int {var}0 = 0, {var}1 = {count};\n"
    return (f"  const int {var}0 = (int)(((long)core_id * {count}) / {threads});\n"
            f"  const int {var}1 = (int)(((long)(core_id + 1) * {count}) / {threads});\n")


def f32(x: float) -> str:
    """A float32 constant, exactly as the kernels' UOps round it."""
    return f"{float(x)!r}f" if math.isfinite(x) else ("__builtin_inff()" if x > 0 else "-__builtin_inff()")


def _tile_sums(rows: int, V: int, M: int, tiles: int, K: int, left: str, row_stride: int, k_stride: int,
               weights_at, indent: str) -> list[str]:
    """C lines that sum a tile into accumulators c{r}_{v} (`rows` rows x V vectors, vector types `vf`/`vfu`):
    tile row r is row t * rows + r of `left` (rows past M read row M - 1), starting row_stride floats apart;
    step k multiplies its element k * k_stride by the V vectors at weights_at(v) (a C pointer expression in k)."""
    lines = []
    for r in range(rows):
        row = f"t * {rows} + {r}"
        at = f"({row} < {M} ? {row} : {M - 1})" if tiles * rows != M else row
        lines.append(f"{indent}const float* restrict a{r} = {left} + (long)({at}) * {row_stride};\n")
    lines.append(f"{indent}vf " + ", ".join(f"c{r}_{v} = 0" for r in range(rows) for v in range(V)) + ";\n")
    lines.append(f"{indent}for (int k = 0; k < {K}; k++) {{\n")
    for v in range(V):
        lines.append(f"{indent}  const vf w{v} = *(const vfu*)({weights_at(v)});\n")
    step = "k" if k_stride == 1 else f"(long)k * {k_stride}"
    for r in range(rows):
        lines.append(f"{indent}  {{ const float x = a{r}[{step}]; " + " ".join(f"c{r}_{v} += x * w{v};" for v in range(V))
                     + " }\n")
    lines.append(f"{indent}}}\n")
    return lines


def linear(name: str, M: int, N: int, K: int, P: int, lanes: int, rows: int, rows_outer: bool, threads: int,
           bias: bool, residual: bool) -> str:
    """out = A @ W.T (+ bias) (+ residual) for A (M, K) and W stored as panels (N/P, K, P): matmul.panel_linear.
    Tiles of `rows` rows x P columns in registers; rows past M read row M-1 and are not stored. Panels
    are split between threads (row tiles where there are fewer panels than threads)."""
    V, n_panels, tiles = P // lanes, N // P, -(-M // rows)
    split_panels = n_panels >= threads
    acc = [[f"c{r}_{v}" for v in range(V)] for r in range(rows)]
    body = [_header(lanes), _signature(name, ["A", "B"] + (["bias"] if bias else []) + (["res"] if residual else []),
                                       threads, lanes),
            " {\n", _share(n_panels if split_panels else tiles, threads, "s")]
    panel_range = ("s0", "s1") if split_panels else ("0", str(n_panels))
    tile_range = ("0", str(tiles)) if split_panels else ("s0", "s1")
    loops = [f"for (int p = {panel_range[0]}; p < {panel_range[1]}; p++)",
             f"for (int t = {tile_range[0]}; t < {tile_range[1]}; t++)"]
    if rows_outer:
        loops.reverse()
    body.append(f"  {loops[0]}\n  {loops[1]} {{\n")
    body.append(f"    const float* restrict b = B + (long)p * {K * P};\n")
    body += _tile_sums(rows, V, M, tiles, K, "A", K, 1, lambda v: f"b + k * {P} + {v * lanes}", "    ")
    for r in range(rows):
        row = f"t * {rows} + {r}"
        stores = []
        for v in range(V):
            col = f"p * {P} + {v * lanes}"
            value = acc[r][v]
            if bias:
                value = f"({value} + *(const vfu*)(bias + {col}))"
            if residual:
                value = f"({value} + *(const vfu*)(res + (long)({row}) * {N} + {col}))"
            stores.append(f"*(vfu*)(out + (long)({row}) * {N} + {col}) = {value};")
        guard = f"if ({row} < {M}) " if tiles * rows != M else ""
        body.append(f"    {guard}{{ {' '.join(stores)} }}\n")
    body.append("  }\n}\n")
    return "".join(body)


def _exp2(t: str) -> tuple[str, str]:
    """(C statements, a C expression) for 2**t (float t in [-126, 126]), as exp.exp2 computes it. The
    expression is the polynomial times the power of two: used inside a larger expression, clang contracts
    it with what follows as it does the UOp form's single rendered expression."""
    poly = f32(EXP2_TAYLOR[-1])
    for c in reversed(EXP2_TAYLOR[:-1]):
        poly = f"(({poly} * f) + {f32(c)})"
    return (f"const int n = (int)({t} + 128.5f) - 128; const float f = {t} - (float)n; "
            f"union {{ int i; float x; }} s; s.i = (n + 127) << 23;", f"({poly} * s.x)")


def activation(name: str, total: int, lanes: int, threads: int, residual: bool) -> str:
    """out = quick_gelu(y) (+ residual), elementwise: matmul.activation with exp.quick_gelu. Split
    between threads in whole vectors."""
    vectors = total // lanes
    return "".join([
        _signature(name, ["Y"] + (["res"] if residual else []), threads, lanes), " {\n", _share(vectors, threads, "s"),
        f"  for (int i = s0 * {lanes}; i < s1 * {lanes}; i++) {{\n",
        "    const float x = Y[i];\n",
        f"    float t = x * {f32(-1.702 / LN2)}; t = t < -126.0f ? -126.0f : t; t = t > 126.0f ? 126.0f : t;\n",
        f"    {_exp2('t')[0]}\n",
        f"    const float g = x * (1.0f / (1.0f + {_exp2('t')[1]}));\n",
        f"    out[i] = {'g + res[i]' if residual else 'g'};\n",
        "  }\n}\n"])


def strides(at) -> tuple[int, int, int, int, int]:
    """(constant, and the strides of its four arguments) of an affine index function at(a, b, c, d)."""
    base = at(0, 0, 0, 0)
    return (base, *(at(*[int(i == axis) for i in range(4)]) - base for axis in range(4)))


def head_product(name: str, dims: tuple[int, ...], rows: int, lanes: int, threads: int, left_at, right_at, out_at,
                 scale: float) -> str:
    """out[out_at(b, h, i, n)] = (sum_c left[left_at(b, h, i, c)] * right[right_at(b, h, n, c)]) * scale for
    dims (B, H, M, N, width, K): attention._head_product. The index functions are affine (their strides are
    read off them); columns n are contiguous in `right` and `out`. Tiles of `rows` x `width`; rows past M read
    row M-1 and are not stored; (batch, head) pairs are split between threads."""
    B, H, M, N, width, K = dims
    vl = min(width, lanes)
    V, tiles = width // vl, -(-M // rows)
    lc, lb, lh, li, lk = strides(left_at)
    rc, rb, rh, rn, rk = strides(right_at)
    oc, ob, oh, oi, on = strides(out_at)
    if rn != 1 or on != 1:
        raise ValueError(f"{name}: columns must be contiguous in the right operand and the output")
    acc = [[f"c{r}_{v}" for v in range(V)] for r in range(rows)]
    body = [_header(vl), _signature(name, ["L", "R"], threads, vl), " {\n", _share(B * H, threads, "s"),
            "  for (int bh = s0; bh < s1; bh++) {\n",
            f"    const int b = bh / {H}, h = bh % {H};\n",
            f"    const float* restrict l = L + {lc} + (long)b * {lb} + (long)h * {lh};\n",
            f"    const float* restrict rt = R + {rc} + (long)b * {rb} + (long)h * {rh};\n",
            f"    float* restrict o = out + {oc} + (long)b * {ob} + (long)h * {oh};\n",
            f"    for (int t = 0; t < {tiles}; t++)\n",
            f"    for (int n = 0; n < {N}; n += {width}) {{\n"]
    body += _tile_sums(rows, V, M, tiles, K, "l", li, lk, lambda v: f"rt + (long)k * {rk} + n + {v * vl}", "      ")
    for r in range(rows):
        row = f"t * {rows} + {r}"
        stores = " ".join(f"*(vfu*)(o + (long)({row}) * {oi} + n + {v * vl}) = " +
                          (f"{acc[r][v]} * {f32(scale)};" if scale != 1.0 else f"{acc[r][v]};") for v in range(V))
        guard = f"if ({row} < {M}) " if tiles * rows != M else ""
        body.append(f"      {guard}{{ {stores} }}\n")
    body.append("    }\n  }\n}\n")
    return "".join(body)


def softmax(name: str, R: int, T: int, Tp: int, threads: int, causal: bool = False) -> str:
    """out (R, T) = softmax over the first T of each row of Tp scores: attention.softmax_rows (max, then
    exp(score - max) by exp.exp2, 0 below 2**-126, then times 1/sum).
    `causal`: row r sees scores 0..r % T only, the others weigh exactly 0, as under an additive mask of
    -inf above the diagonal (the same max, the same sum: the zeros add nothing). Rows are split between
    threads."""
    score = f"S[(long)r * {Tp} + j]"
    pre, power = _exp2("u")
    seen = f"r % {T} + 1" if causal else str(T)      # the scores a row sees: 0 .. seen - 1
    return "".join([
        _signature(name, ["S"], threads), " {\n", _share(R, threads, "s"),
        "  for (int r = s0; r < s1; r++) {\n",
        f"    const int seen = {seen};\n",
        "    float top = -__builtin_inff();\n",
        f"    for (int j = 0; j < seen; j++) {{ const float x = {score}; top = x > top ? x : top; }}\n",
        "    float total = 0.0f;\n",
        f"    float* restrict o = out + (long)r * {T};\n",
        "    for (int j = 0; j < seen; j++) {\n",
        f"      const float t = ({score} - top) * {f32(1 / LN2)};\n",
        "      const float u = t < -126.0f ? -126.0f : t;\n",
        f"      {pre}\n",
        f"      o[j] = {power} * (t > -126.0f ? 1.0f : 0.0f);\n",
        "    }\n",
        f"    for (int j = seen; j < {T}; j++) o[j] = 0.0f;\n",
        f"    for (int j = 0; j < {T}; j++) total += o[j];\n",
        "    const float inv = 1.0f / total;\n",
        f"    for (int j = 0; j < {T}; j++) o[j] = o[j] * inv;\n",
        "  }\n}\n"])


def layer_norm(name: str, R: int, C: int, lane_sums: int, eps: float, threads: int) -> str:
    """out = (x - mean) * (1/sqrt(var + eps)) * w + b over rows of C: norm.layer_norm (each sum kept in
    `lane_sums` partial sums over the columns lane, lane + lane_sums, ..., added in lane order at the end).
    Rows are split between threads."""
    def row_sum(value: str, into: str) -> str:   # lanes inner: clang keeps the partial sums in one vector
        return (f"    float {into}_p[{lane_sums}] = {{0}};\n"
                f"    for (int q = 0; q < {C // lane_sums}; q++)\n"
                f"      for (int l = 0; l < {lane_sums}; l++) {{ const float x = xr[q * {lane_sums} + l]; {into}_p[l] += {value}; }}\n"
                f"    float {into} = {into}_p[0];\n"
                f"    for (int l = 1; l < {lane_sums}; l++) {into} += {into}_p[l];\n")
    return "".join([
        _signature(name, ["X", "W", "Bias"], threads), " {\n", _share(R, threads, "s"),
        "  for (int r = s0; r < s1; r++) {\n",
        f"    const float* restrict xr = X + (long)r * {C};\n",
        row_sum("x", "sum"),
        f"    const float mean = sum * {f32(1.0 / C)};\n",
        row_sum("(x - mean) * (x - mean)", "sq"),
        f"    const float var = sq * {f32(1.0 / C)};\n",
        f"    const float rstd = 1.0f / __builtin_sqrtf(var + {f32(eps)});\n",
        f"    float* restrict o = out + (long)r * {C};\n",
        f"    for (int c = 0; c < {C}; c++) o[c] = (xr[c] - mean) * rstd * W[c] + Bias[c];\n",
        "  }\n}\n"])


# ---- moving values into place (layout.py): copies and single adds, exact -----------------------------------

def embed_tokens(name: str, R: int, T: int, V: int, C: int) -> str:
    """out (R, C) = tokens[ids[r]] + positions[r % T] for R = batch x T ids, tables (V, C) and (>= T, C): the
    text embeddings. An id outside the table gathers zeros, as tinygrad's indexing does (out = positions)."""
    return "".join([
        _signature(name, ["int ids", "tokens", "positions"], 1), " {\n",
        f"  for (int r = 0; r < {R}; r++) {{\n",
        "    const unsigned id = (unsigned)ids[r];\n",
        f"    const float* restrict p = positions + (long)(r % {T}) * {C};\n",
        f"    float* restrict o = out + (long)r * {C};\n",
        f"    if (id < {V}u) {{ const float* restrict e = tokens + (long)id * {C}; "
        f"for (int c = 0; c < {C}; c++) o[c] = e[c] + p[c]; }}\n",
        f"    else for (int c = 0; c < {C}; c++) o[c] = p[c];\n",
        "  }\n}\n"])


def pool_rows(name: str, B: int, T: int, C: int, rule: str, eos: int = 0) -> str:
    """out (B, C) = x[b, position b] for x (B, T, C): the position each row pools from. rule "first": 0 (a
    ViT's class token); "eos": the first id equal to `eos`, else 0; "largest": the first of the largest id
    (pooling.py's rule, for token ids (B, T) int32 given after x)."""
    if rule == "first":
        find = "    const int at = 0;\n"
    else:
        hit = f"i[j] == {eos}" if rule == "eos" else "i[j] == top"
        find = (f"    const int* restrict i = ids + (long)b * {T};\n"
                + ("    int top = i[0];\n"
                   f"    for (int j = 1; j < {T}; j++) top = i[j] > top ? i[j] : top;\n" if rule == "largest" else "")
                + f"    int at = 0;\n    for (int j = {T - 1}; j >= 0; j--) if ({hit}) at = j;\n")
    return "".join([
        _signature(name, ["X"] + ([] if rule == "first" else ["int ids"]), 1), " {\n",
        f"  for (int b = 0; b < {B}; b++) {{\n", find,
        f"    const float* restrict x = X + ((long)b * {T} + at) * {C};\n",
        f"    for (int c = 0; c < {C}; c++) out[(long)b * {C} + c] = x[c];\n",
        "  }\n}\n"])


def heads_transposed(name: str, B: int, T: int, H: int, d: int, Tp: int) -> str:
    """out (B, H, d, Tp) = k (B, T, H*d) with positions last, zero past T: attention's keys, laid out so
    that a tile reads consecutive positions as vectors."""
    return "".join([
        _signature(name, ["K"], 1), " {\n",
        f"  for (int bh = 0; bh < {B * H}; bh++) {{\n",
        f"    const int b = bh / {H}, h = bh % {H};\n",
        f"    for (int c = 0; c < {d}; c++) {{\n",
        f"      float* restrict o = out + ((long)bh * {d} + c) * {Tp};\n",
        f"      const float* restrict k = K + (long)b * {T * H * d} + h * {d} + c;\n",
        f"      for (int j = 0; j < {T}; j++) o[j] = k[(long)j * {H * d}];\n",
        f"      for (int j = {T}; j < {Tp}; j++) o[j] = 0.0f;\n",
        "    }\n  }\n}\n"])


def pixel_values(name: str, N: int, H: int, W: int, C: int, scale: float | None, mean, std) -> str:
    """out (N, C, H, W) float32 = (x * scale - mean[c]) / std[c] for uint8 crops x (N, H, W, C), each step
    skipped where None, in float32 (preprocess.PixelScaling's steps; pixels.py)."""
    value = "(float)x[c]"
    if scale is not None:
        value = f"({value} * {f32(scale)})"
    if mean is not None:
        value = f"({value} - m[c])"
    if std is not None:
        value = f"({value} / s[c])"
    table = "".join(f"  static const float {n}[{C}] = {{{', '.join(f32(v) for v in vals)}}};\n"
                    for n, vals in (("m", mean), ("s", std)) if vals is not None)
    return "".join([
        _signature(name, ["unsigned char X"], 1), " {\n", table,
        f"  for (long p = 0; p < {N * H * W}; p++) {{\n",
        f"    const unsigned char* restrict x = X + p * {C};\n",
        f"    const long n = p / {H * W}, yx = p % {H * W};\n",
        f"    for (int c = 0; c < {C}; c++) out[(n * {C} + c) * {H * W} + yx] = {value};\n",
        "  }\n}\n"])


def patches(name: str, B: int, C: int, H: int, W: int, p: int) -> str:
    """out (B, (H/p)*(W/p), C*p*p) = the non-overlapping p x p patches of x (B, C, H, W), each as (C, p, p)
    in order: a patch convolution's input as a matmul's rows."""
    gh, gw = H // p, W // p
    return "".join([
        _signature(name, ["X"], 1), " {\n",
        f"  for (int b = 0; b < {B}; b++)\n  for (int g = 0; g < {gh * gw}; g++)\n  for (int c = 0; c < {C}; c++)\n",
        f"  for (int y = 0; y < {p}; y++) {{\n",
        f"    const float* restrict x = X + (((long)b * {C} + c) * {H} + (g / {gw}) * {p} + y) * {W} + (g % {gw}) * {p};\n",
        f"    float* restrict o = out + (((long)b * {gh * gw} + g) * {C} + c) * {p * p} + y * {p};\n",
        f"    for (int x_ = 0; x_ < {p}; x_++) o[x_] = x[x_];\n",
        "  }\n}\n"])


def class_and_positions(name: str, B: int, G: int, C: int) -> str:
    """out (B, 1 + G, C) = [cls, patches[b]] + positions (1 + G, C): a ViT's tokens before its first norm."""
    return "".join([
        _signature(name, ["P", "cls", "positions"], 1), " {\n",
        f"  for (int b = 0; b < {B}; b++) {{\n",
        f"    float* restrict o = out + (long)b * {(G + 1) * C};\n",
        f"    for (int c = 0; c < {C}; c++) o[c] = cls[c] + positions[c];\n",
        f"    const float* restrict x = P + (long)b * {G * C};\n",
        f"    for (long i = 0; i < {G * C}; i++) o[{C} + i] = x[i] + positions[{C} + i];\n",
        "  }\n}\n"])
