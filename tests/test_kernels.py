"""tinyclip.kernels.cpu: the tiled CPU kernels give the numbers tinygrad's default kernels give, on every
instruction-set path this machine runs (AVX2, and AVX-512 where the CPU has it).

Both sum each output in float32, in different orders (the default kernel unrolls the reduction in
fours), so they agree to float32 rounding: within LINEAR_TOL of the largest output for 768-long
sums of unit normals, as each is of the float64 product. A model on the CPU kernel set equals the
same model on tinygrad's default kernels (MODEL_VS_DEFAULT) and transformers (MODEL_VS_ORACLE).
A path this CPU cannot run is skipped, with the flags it lacks.
"""
import dataclasses
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from tinygrad import Tensor
from tinygrad.helpers import Context

import tinyclip
from tinyclip import cpu_info
from tinyclip._tinygrad import buffers, cpu_runtime, cpu_threads
from tinyclip.errors import BackendError
from tinyclip.kernels import TINYGRAD, cpu
from tinyclip.kernels.cpu import attention, exp, isa as isas, matmul, norm, tuning
from tinyclip.kernels.cpu.machine import Machine, cache_sizes
from tinyclip.model import Conv2dPatch, Linear, walk
from tinyclip.registry import RawDevice
from tests.checkpoints import build_checkpoint, clip_config

RENDERERS = ["CLANG", "LLVM"]
LINEAR_TOL = 4e-6          # of the largest output: float32 sums in another order
ATTENTION_TOL = 2e-6
LAYER_NORM_TOL = 1e-6
MODEL_VS_DEFAULT = 1e-6    # the bounds: a whole model on the CPU set against tinygrad's default kernels
MODEL_VS_ORACLE = 1e-5     # ... and against transformers
DEFAULT_TILE_ROWS = 4      # a tile every ISA has among its candidates: whole tiles for 64 rows, a partial one for 50


@pytest.fixture(params=[isa.name for isa in isas.ISAS])
def isa(request):
    chosen = isas.BY_NAME[request.param]
    if chosen not in isas.runnable():
        missing = [f for f in chosen.needs if f not in cpu_info.flags()]
        pytest.skip(f"this CPU cannot run the {chosen.name} path (lacks {', '.join(missing) or 'the architecture'})")
    return chosen


def device(renderer: str, isa) -> str:
    """The DEV setting the cpu backend would use for this path: a narrower ISA compiles for its own target."""
    _, arch = isas.choose(isa.name)
    return f"CPU:{renderer}" + (f":{arch}" if arch else "")


def machine(isa, threads=1, tile_rows=None, rows_outer=False, l2=None) -> Machine:
    """A Machine with chosen tiles (every candidate gets tested, whatever tuning would pick here) and a
    hand-off cost of 0, so that every kernel big enough to divide is split between `threads`."""
    l1d, real_l2 = cache_sizes()
    return Machine(isa, l1d, l2 or real_l2, threads=threads, tile_rows=tile_rows or DEFAULT_TILE_ROWS,
                   rows_outer=rows_outer, handoff_us=0.0, macs_per_us=1.0)


@pytest.fixture(scope="module", autouse=True)
def _runtime_patches():
    assert cpu_runtime.install(), "the tested tinygrad must get tinyclip's CPU runtime patches"


# (rows, in, out): row counts that are and are not multiples of a tile, one panel and many, panel counts
# that do and do not split between two threads, one- and two-vector panels, ViT-B/32's fc1 at batch 1
# (cached input: panels outside rows) and an input over half of L2 (the order measured on the machine).
SHAPES = [(1, 8, 8), (4, 8, 16), (3, 8, 24), (5, 12, 48), (8, 7, 16), (9, 12, 64), (50, 768, 3072),
          (2, 768, 512), (197, 33, 96), (258, 1040, 64)]


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("rows,fan_in,fan_out", SHAPES)
def test_panel_linear_equals_the_default_kernel(isa, renderer, rows, fan_in, fan_out):
    if matmul.panel_width(fan_out, isa.lanes) is None:
        pytest.skip(f"{fan_out} outputs make no {isa.lanes}-lane panel: the layer stays on tinygrad's kernel")
    rng = np.random.default_rng(rows * 1000 + fan_out)
    x = rng.standard_normal((rows, fan_in), dtype=np.float32)
    w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
    bias = rows % 2 == 1
    b = rng.standard_normal(fan_out, dtype=np.float32) if bias else None
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    scale = np.abs(exact).max()
    # each tile-row candidate, both loop orders (a tiny L2 makes every input "large"), one and all threads;
    # LLVM renders the same kernels: one of each order is enough there
    tiles = [(r, outer, t) for r in isa.tile_rows for outer, t in ((False, 1), (True, cpu_threads()))]
    tiles = tiles if renderer == "CLANG" else tiles[:2]
    with Context(DEV=device(renderer, isa)):
        wt, bt = Tensor(w, device="CPU"), (Tensor(b, device="CPU") if bias else None)
        default = Tensor(x, device="CPU").linear(wt.T, bt).numpy()
        panels = matmul.to_panels(wt, matmul.panel_width(fan_out, isa.lanes)).realize()
        for tile_rows, rows_outer, threads in tiles:
            m = machine(isa, threads, tile_rows, rows_outer, l2=1024 if rows_outer else None)
            got = matmul.panel_linear(Tensor(x, device="CPU"), panels, bt, None, None, m).numpy()
            assert got.shape == (rows, fan_out)
            assert np.abs(got - default).max() <= LINEAR_TOL * scale, (tile_rows, rows_outer, threads)
            assert np.abs(got - exact).max() <= LINEAR_TOL * scale, (tile_rows, rows_outer, threads)


def test_panel_linear_keeps_leading_dimensions(isa):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 5, 8), dtype=np.float32)
    w = rng.standard_normal((32, 8), dtype=np.float32)
    with Context(DEV=device("CLANG", isa)):
        panels = matmul.to_panels(Tensor(w, device="CPU"), matmul.panel_width(32, isa.lanes))
        got = matmul.panel_linear(Tensor(x, device="CPU"), panels, None, None, None, machine(isa)).numpy()
    assert got.shape == (2, 3, 5, 32)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)


def test_panel_linear_refuses_a_mismatched_input(isa):
    with Context(DEV=device("CLANG", isa)):
        panels = matmul.to_panels(Tensor.zeros(32, 8, device="CPU"), isa.lanes)
        with pytest.raises(ValueError, match="input has 9 features, weight expects 8"):
            matmul.panel_linear(Tensor.zeros(4, 9, device="CPU"), panels, None, None, None, machine(isa))


def test_panels_are_two_vectors_wide_where_they_divide_else_one():
    assert matmul.panel_width(3072, 8) == 16 and matmul.panel_width(3072, 16) == 32
    assert matmul.panel_width(48, 8) == 16 and matmul.panel_width(48, 16) == 16
    assert matmul.panel_width(24, 8) == 8 and matmul.panel_width(24, 16) is None
    assert matmul.panel_width(36, 8) is None and matmul.panel_width(17, 16) is None


@pytest.mark.parametrize("out_features,in_features,chunk_bytes", [(32, 8, 1 << 19), (64 * 32, 96, 4096), (48, 5, 1)])
def test_panels_rearranged_in_place_equal_the_copied_ones(monkeypatch, out_features, in_features, chunk_bytes):
    """A weight given up (reuse=True) is rearranged in its own buffer, in chunks shared by two threads
    where there are many: the same panels as the copy into a new buffer, in the same memory."""
    monkeypatch.setattr(matmul, "PANEL_CHUNK_BYTES", chunk_bytes)
    w = np.random.default_rng(3).standard_normal((out_features, in_features), dtype=np.float32)
    width = 16 if out_features % 32 else 32
    copied = matmul.to_panels(buffers.from_numpy(w, "CPU"), width).numpy()
    given = buffers.from_numpy(w, "CPU")
    before = given.uop.base.buffer
    panels = matmul.to_panels(given, width, reuse=True)
    assert panels.uop.base.buffer is before and panels.shape == copied.shape
    np.testing.assert_array_equal(buffers.host_array(panels), copied)
    np.testing.assert_array_equal(matmul.from_panels(panels).numpy(), w)


def test_prepare_rewrites_only_the_buffers_handed_over_to_it():
    """A model's prepare() rearranges in place only buffers the tower loader handed over (read just now, each
    held by one parameter): a weight a caller filled and still holds keeps its values, and a weight tied
    to two layers is rearranged once per layer into buffers of their own, both right."""
    kernels = cpu.CPUKernels(isas.runnable()[-1])
    if not kernels.active:
        pytest.skip("tinyclip's CPU runtime is not installed for this tinygrad")
    w = np.random.default_rng(4).standard_normal((64, 16), dtype=np.float32)
    mine = buffers.from_numpy(w, "CPU")
    a, b = (Linear(16, 64, False, mine.dtype, "CPU", kernels) for _ in range(2))
    a.weight = b.weight = mine
    a.prepare()
    b.prepare()
    np.testing.assert_array_equal(mine.numpy(), w)
    for layer in (a, b):
        np.testing.assert_array_equal(layer.dense_weight.numpy(), w)
    handed = buffers.from_numpy(w, "CPU")
    c = Linear(16, 64, False, handed.dtype, "CPU", kernels)
    c.weight = handed
    with kernels.handing_over({buffers.buffer_of(handed)}):
        c.prepare()
    assert buffers.buffer_of(c.weight).buffer is buffers.buffer_of(handed).buffer      # the same memory
    np.testing.assert_array_equal(c.dense_weight.numpy(), w)


def test_panels_of_a_weight_not_its_own_buffer_are_copied():
    """A weight that is a view (here a slice) has no buffer of its own to rewrite: it is copied, and stays."""
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    whole = buffers.from_numpy(w, "CPU")
    panels = matmul.to_panels(whole[:32], 16, reuse=True)
    np.testing.assert_array_equal(matmul.from_panels(panels).numpy(), w[:32])
    np.testing.assert_array_equal(whole.numpy(), w)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """Every width a multiple of 16, so every linear layer and the patch embedding run on panels on both paths."""
    folder = tmp_path_factory.mktemp("tiny16")
    torch_model = build_checkpoint(folder, clip_config(text=(32, 64, 2, 2), vision=(32, 64, 2, 2, 32, 16), proj=16),
                                   seed=5, perturb=0.02)
    return folder, torch_model


@pytest.mark.slow   # compiles both towers, several times: about a minute
def test_a_model_on_the_cpu_set_equals_the_same_model_on_default_kernels_and_transformers(isa, tiny16, monkeypatch):
    import torch
    from tinyclip_backends.cpu import CPU
    folder, torch_model = tiny16
    monkeypatch.setenv(isas.ENV, isa.name)
    fast = tinyclip.load(folder, device=CPU())      # a fresh backend object reads TINYCLIP_CPU_ISA
    plain = tinyclip.load(folder, device=RawDevice("CPU:CLANG"))   # a raw device: tinygrad's kernels
    assert fast.model.kernels.isa is isa and plain.model.kernels is TINYGRAD
    layers = [m for m in walk(fast.model) if isinstance(m, (Linear, Conv2dPatch))]
    assert layers and all(m.weight.ndim == 3 for m in layers)          # all on panels
    assert not any(m.weight.ndim == 3 for m in walk(plain.model) if isinstance(m, (Linear, Conv2dPatch)))

    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((3, 3, 32, 32), dtype=np.float32)
    ids = fast.tokenize(["a photo of a cat", "two dogs", ""])
    cases = [("encode_image", pixels, "get_image_features"), ("encode_text", ids, "get_text_features"),
             ("encode_text", ids[1:2], "get_text_features")]   # one text: batch x heads = 2 softmax row groups
    for encode, x, oracle in cases:
        got = getattr(fast, encode)(x, normalize=False)
        ref = getattr(plain, encode)(x, normalize=False)
        with torch.no_grad():
            out = getattr(torch_model, oracle)(torch.from_numpy(x.astype(np.int64) if x.dtype != np.float32 else x))
        truth = (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()
        scale = np.abs(truth).max()
        assert np.abs(got - ref).max() <= MODEL_VS_DEFAULT * scale, encode
        assert np.abs(got - truth).max() <= MODEL_VS_ORACLE * scale, encode


WIDE_SCRIPT = """
import sys
from tinygrad import Tensor
from tinygrad.helpers import Context
from tinyclip._tinygrad import cpu_runtime
from tinyclip.kernels.cpu import isa as isas, matmul
from tinyclip.kernels.cpu.machine import Machine
cpu_runtime.install()
isa = isas.BY_NAME[sys.argv[2]]
m = Machine(isa, 32768, 1 << 20, threads=1, tile_rows=4, rows_outer=False, handoff_us=1, macs_per_us=1)
with Context(DEV=sys.argv[1]):
    panels = matmul.to_panels(Tensor.ones(64, 16, device="CPU").contiguous().realize(), 2 * isa.lanes)
    x = Tensor.ones(8, 16, device="CPU") * 2     # more kernels in one schedule: compiled by the worker pool
    print("sum", matmul.panel_linear(x, panels, None, None, None, m).sum().item())
"""


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("parallel", ["0", "2"])
def test_kernels_use_the_isas_vectors_in_process_and_in_compile_workers(isa, renderer, parallel):
    """The matmul's source (DEBUG=4) computes in vectors of the ISA's lanes. On CLANG it is tinyclip's C
    (kernels/cpu/csource.py): vector variables of the lanes for every accumulator. On LLVM it is built
    from UOps, and tinyclip's coalescing pass (_tinygrad/cpu_runtime.py) must reach tinygrad's compile
    workers too: loads and stores of the lanes, the accumulators reached as whole vectors only."""
    env = dict(os.environ, DEBUG="4", PARALLEL=parallel, CACHELEVEL="0")
    r = subprocess.run([sys.executable, "-c", WIDE_SCRIPT, device(renderer, isa), isa.name], env=env,
                       capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "sum 16384.0" in out     # 8 rows x 64 outputs x (16 inputs x 2 x 1)
    name = f"tc{isa.lanes}_linear_8_64_16"
    if renderer == "CLANG":
        start = out.index(f"typedef float vf __attribute__((ext_vector_type({isa.lanes})));")
        source = out[start:out.index("\n}", start)]
        assert f"void {name}(" in source
        # its vectors stay whole where clang's tuning prefers narrower ones (Intel's AVX-512 CPUs prefer 256 bits)
        assert f"__attribute__((min_vector_width({32 * isa.lanes}))) void {name}(" in source
        # 4 rows x 2 vectors of accumulators, each a vector variable (registers), none an array in memory
        assert re.search(r"vf c0_0 = 0, c0_1 = 0, c1_0 = 0, c1_1 = 0, c2_0 = 0, c2_1 = 0, c3_0 = 0, c3_1 = 0;", source)
        assert "[" not in source.split(f"void {name}(")[1].split("for (int k")[0].replace("A[", "").replace("B[", "")
        return
    source = out[out.index(f"@{name}("):]
    source = source[:source.index("\n}")]
    assert f"<{isa.lanes} x float>" in source
    # The accumulators (a register array) are reached as whole vectors only: every offset into the
    # array is a multiple of the lanes (scalar accesses, which clang 14 spills on AVX2, would not be).
    offsets = [int(n) for n in re.findall(r"%reg_\d+, i32 (\d+)", source)]
    assert len(set(offsets)) == 4 * 2 and all(n % isa.lanes == 0 for n in offsets), sorted(set(offsets))


@pytest.mark.parametrize("renderer", RENDERERS)
def test_quick_gelu_in_the_matmul_kernel_equals_the_formula(isa, renderer):
    """exp.quick_gelu (branch-free exp2) run in the kernel's epilogue, on values from -200 to 200
    (through an identity weight, so the kernel's input is its output), against float64."""
    x = np.concatenate([np.linspace(-200, 200, 4001), np.linspace(-3, 3, 4001), [0.0, 1e-30, -1e-30]])
    x = np.resize(x, (-(-len(x) // 16), 16)).astype(np.float32)
    with Context(DEV=device(renderer, isa)):
        panels = matmul.to_panels(Tensor(np.eye(16, dtype=np.float32), device="CPU"), 16)
        got = matmul.panel_linear(Tensor(x, device="CPU"), panels, None, exp.quick_gelu, None, machine(isa)).numpy()
    x64 = x.astype(np.float64)
    exact = x64 / (1 + np.exp(-1.702 * x64))
    # float32 holds the exponent 1.702 x to a relative 2**-24, which exp turns into a relative error
    # of |1.702 x| 2**-24 in the result (torch's own float32 sigmoid has the same); 3e-7 on top.
    bound = (3e-7 + np.abs(1.702 * x64) * 2.0 ** -23) * np.abs(exact) + 1e-30
    assert np.all(np.abs(got - exact) <= bound)


def _attention_float64(q, k, v, heads, causal):
    B, T, C = q.shape
    q, k, v = (t.astype(np.float64).reshape(B, T, heads, C // heads).transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // heads)
    if causal:
        scores = scores + np.triu(np.full((T, T), -np.inf), 1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(B, T, C)


# (batch, positions, width, heads, causal): ViT-B/32's 50 positions (one-vector key tiles, padded query
# rows), a text length with two-vector tiles, 77 positions, a head width of 12 (4-lane value tiles), one
# batch and one head, one position (no tile of rows).
ATTENTION_SHAPES = [(2, 50, 128, 2, False), (3, 12, 64, 4, True), (1, 77, 64, 2, True), (2, 17, 48, 4, False),
                    (1, 5, 32, 1, True), (2, 1, 32, 2, False)]


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("batch,positions,width,heads,causal", ATTENTION_SHAPES)
def test_attention_equals_the_default_kernels_and_float64(isa, renderer, batch, positions, width, heads, causal):
    rng = np.random.default_rng(positions * 100 + width)
    q, k, v = (rng.standard_normal((batch, positions, width), dtype=np.float32) * 2 for _ in range(3))
    with Context(DEV=device(renderer, isa)):
        qt, kt, vt = (Tensor(t, device="CPU") for t in (q, k, v))
        got = attention.attention(qt, kt, vt, heads, causal, machine(isa, cpu_threads())).numpy()
        default = TINYGRAD.attention(qt, kt, vt, heads, causal).numpy()
    exact = _attention_float64(q, k, v, heads, causal)
    scale = np.abs(exact).max()
    assert got.shape == (batch, positions, width)
    assert np.abs(got - default).max() <= ATTENTION_TOL * scale
    assert np.abs(got - exact).max() <= ATTENTION_TOL * scale


def test_threaded_kernels_run_on_several_cores_with_the_serial_results(isa, monkeypatch):
    """tinygrad runs a THREAD-split CPU kernel's parts one after the other; cpu_runtime's patch hands
    parts 1..n-1 to helper threads. Same numbers, bit for bit, as the serial calls. A kernel one core
    finishes in a few hand-offs is not split."""
    from tinygrad.runtime import ops_cpu
    threads = cpu_threads()
    if threads < 2:
        pytest.skip("one core: tinygrad makes no THREAD-split kernels")

    class Recording:   # the helpers' task queue, recording each part handed over
        def __init__(self, tasks):
            self.tasks, self.parts = tasks, []

        def put(self, task):
            self.parts.append(task[1][-1].value)   # core_id, the kernel's last argument
            self.tasks.put(task)

    rng = np.random.default_rng(3)
    x = rng.standard_normal((128, 256), dtype=np.float32)
    w = rng.standard_normal((512, 256), dtype=np.float32)
    slow_handoff = dataclasses.replace(machine(isa, threads), handoff_us=float("inf"))   # never worth a hand-off
    with Context(DEV=device("CLANG", isa)):
        xt = Tensor(x, device="CPU").realize()     # inputs copied in before recording: only the matmul counts
        panels = matmul.to_panels(Tensor(w, device="CPU"), 2 * isa.lanes).realize()
        recording = Recording(cpu_runtime._helper_tasks())
        monkeypatch.setattr(cpu_runtime, "_helper_tasks", lambda: recording)
        matmul.panel_linear(xt, panels, None, None, None, slow_handoff).realize()
        assert recording.parts == [], "a kernel shorter than a few hand-offs is not split"
        threaded = matmul.panel_linear(xt, panels, None, None, None, machine(isa, threads)).numpy()
        assert recording.parts == list(range(1, threads))
        monkeypatch.setattr(ops_cpu.CPUProgram, "__call__", ops_cpu.CPUProgram.__call__.tinyclip_serial)
        serial = matmul.panel_linear(xt, panels, None, None, None, machine(isa, threads)).numpy()
    assert recording.parts == list(range(1, threads))
    np.testing.assert_array_equal(threaded, serial)
    np.testing.assert_allclose(threaded, x.astype(np.float64) @ w.T, rtol=0, atol=LINEAR_TOL * np.abs(x @ w.T).max())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_threaded_kernels_run_in_a_forked_child(isa):
    """A child forked after the helper threads started has none of them: it must start its own,
    not queue work for threads that do not exist (which would hang)."""
    import signal
    rng = np.random.default_rng(4)
    x = rng.standard_normal((128, 256), dtype=np.float32)
    w = rng.standard_normal((512, 256), dtype=np.float32)
    m = machine(isa, cpu_threads())
    with Context(DEV=device("CLANG", isa)):
        panels = matmul.to_panels(Tensor(w, device="CPU"), 2 * isa.lanes).realize()
        parent = matmul.panel_linear(Tensor(x, device="CPU"), panels, None, None, None, m).numpy()
        assert cpu_runtime._helpers is not None
        pid = os.fork()
        if pid == 0:   # the child: same kernel (already compiled), no pytest machinery after this
            signal.alarm(60)
            try:
                child = matmul.panel_linear(Tensor(x, device="CPU"), panels, None, None, None, m).numpy()
                os._exit(0 if np.array_equal(child, parent) else 3)
            except BaseException:
                os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# (rows, width): text and image shapes (rows split between threads), the narrowest width (two steps
# of 8), rows that do not split between two threads, one row.
@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("rows,width", [(320, 512), (50, 768), (6, 16), (7, 24), (1, 32)])
def test_layer_norm_equals_the_default_kernels_and_float64(isa, renderer, rows, width):
    rng = np.random.default_rng(rows + width)
    x = (rng.standard_normal((rows, width)) * 3 + 2).astype(np.float32)   # a mean far from 0
    w, b = (rng.standard_normal(width).astype(np.float32) for _ in range(2))
    with Context(DEV=device(renderer, isa)):
        xt, wt, bt = (Tensor(t, device="CPU") for t in (x, w, b))
        got = norm.layer_norm(xt.reshape(1, rows, width), wt, bt, 1e-5, machine(isa, cpu_threads())).numpy()
        default = TINYGRAD.layer_norm(xt, wt, bt, 1e-5).numpy()
    x64 = x.astype(np.float64)
    exact = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * w + b
    scale = np.abs(exact).max()
    assert got.shape == (1, rows, width)
    assert np.abs(got[0] - default).max() <= LAYER_NORM_TOL * scale
    assert np.abs(got[0] - exact).max() <= LAYER_NORM_TOL * scale


def test_layer_norm_refuses_a_width_it_cannot_tile(isa):
    with Context(DEV=device("CLANG", isa)):
        for width in (8, 20):
            x, w = Tensor.zeros(2, width, device="CPU"), Tensor.ones(width, device="CPU")
            with pytest.raises(ValueError, match=f"width {width} is not a multiple of 8 of at least 16"):
                norm.layer_norm(x, w, w, 1e-5, machine(isa))


@pytest.mark.parametrize("renderer", RENDERERS)
@pytest.mark.parametrize("rows", [50, 64])   # rows past the last tile (read clamped) and whole tiles
def test_panel_linear_adds_the_residual_like_a_separate_add(isa, renderer, rows):
    rng = np.random.default_rng(rows)
    x, skip = rng.standard_normal((2, rows, 48), dtype=np.float32), rng.standard_normal((2, rows, 32), dtype=np.float32)
    w, b = rng.standard_normal((32, 48), dtype=np.float32), rng.standard_normal(32, dtype=np.float32)
    m = machine(isa)
    with Context(DEV=device(renderer, isa)):
        panels, bt = matmul.to_panels(Tensor(w, device="CPU"), 16).realize(), Tensor(b, device="CPU")
        xt, st = Tensor(x, device="CPU"), Tensor(skip, device="CPU")
        fused = matmul.panel_linear(xt, panels, bt, exp.quick_gelu, st, m).numpy()
        separate = (matmul.panel_linear(xt, panels, bt, exp.quick_gelu, None, m) + st).numpy()
        with pytest.raises(ValueError, match=r"residual has shape \(2, 50\), the output \(2, .*, 32\)"):
            matmul.panel_linear(xt, panels, bt, None, Tensor.zeros(2, 50, device="CPU"), m)
    np.testing.assert_array_equal(fused, separate)   # the same float32 operations in the same order


@pytest.mark.parametrize("renderer", RENDERERS)
def test_attention_softmax_gives_masked_keys_exactly_zero_weight(isa, renderer):
    """The softmax kernel's exp is exp.exp2 (clamped at 2**-126), not tinygrad's: a key the causal mask
    hides must still get a weight of exactly 0 (the C kernel skips it, the UOp one adds -inf), and the
    others float64's softmax to float32 rounding."""
    T, Tp, R = 6, 8, 12
    rng = np.random.default_rng(5)
    scores = rng.standard_normal((R, Tp), dtype=np.float32) * 30   # exp(score - max) down to ~e**-200
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    with Context(DEV=device(renderer, isa)):
        got = attention.softmax_rows(Tensor(scores, device="CPU"), R, T, Tp, True, machine(isa)).numpy()
    got = got.reshape(R, T)
    x = scores[:, :T].astype(np.float64) + np.tile(mask, (R // T, 1))
    exact = np.exp(x - x.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    assert np.all(got[np.isinf(x)] == 0)
    np.testing.assert_allclose(got, exact, rtol=0, atol=LAYER_NORM_TOL)


# ---- choosing the path ----------------------------------------------------------------------------------

AVX512_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq"})


def test_native_takes_the_widest_set_the_cpu_has_and_a_narrower_one_compiles_for_its_own_target():
    assert isas.choose("native", AVX512_FLAGS, "x86_64") == (isas.BY_NAME["avx512"], "")
    assert isas.choose("avx2", AVX512_FLAGS, "x86_64") == (isas.BY_NAME["avx2"], "x86_64,x86-64-v3")
    assert isas.choose("native", frozenset({"avx2", "fma"}), "x86_64") == (isas.BY_NAME["avx2"], "")
    assert isas.choose("native", frozenset({"sse4_2"}), "x86_64") == (None, "")        # an older x86-64
    assert isas.choose("native", frozenset({"asimd", "fp"}), "aarch64") == (None, "")  # arm64: NEON not yet


def test_a_forced_set_the_cpu_lacks_says_which_flags_are_missing():
    with pytest.raises(BackendError, match=r"TINYCLIP_CPU_ISA=avx512 but this CPU cannot run it \(missing: "
                                           r"avx512f, avx512vl, avx512bw, avx512dq\); it runs avx2"):
        isas.choose("avx512", frozenset({"avx2", "fma"}), "x86_64")
    with pytest.raises(BackendError, match=r"TINYCLIP_CPU_ISA='sse' is not one of native, avx512, avx2"):
        isas.choose("sse")


@pytest.mark.parametrize("name", ["cpu", "cpu-llvm"])
def test_both_cpu_backends_report_a_bad_isa_setting_as_it_is(monkeypatch, name):
    """The setting's own sentence is the backend's reason, with nothing prefixed (tinyclip backends shows it)."""
    from tinyclip_backends.cpu import CPU, CPULLVM
    monkeypatch.setenv("TINYCLIP_CPU_ISA", "sse")
    backend = {"cpu": CPU, "cpu-llvm": CPULLVM}[name]()
    assert not backend.available
    assert backend.unavailable == "TINYCLIP_CPU_ISA='sse' is not one of native, avx512, avx2"


def test_a_cpu_without_a_tiled_path_runs_tinygrads_kernels(monkeypatch, tiny16):
    """An older x86-64 or an arm64 gets the plain set: the cpu backend still loads and computes."""
    from tinyclip_backends.cpu import CPU
    monkeypatch.setattr(isas, "runnable", lambda flags=None, machine=None: [])
    backend = CPU()
    assert backend.kernel_set() is TINYGRAD and backend.available
    # no graph cache: a graph another test saved could serve one of them (batch_plan), to float32 rounding
    clip = tinyclip.load(tiny16[0], device=backend, graph_cache=False)
    plain = tinyclip.load(tiny16[0], device=RawDevice("CPU:CLANG"), graph_cache=False)
    ids = clip.tokenize(["a photo of a cat"])
    np.testing.assert_array_equal(clip.encode_text(ids), plain.encode_text(ids))


def test_an_untested_tinygrad_turns_the_patches_off_with_a_warning_and_stays_exact(monkeypatch, tiny16):
    from tinyclip_backends.cpu import CPU
    monkeypatch.setattr(cpu_runtime, "_installed", None)
    monkeypatch.setattr(cpu_runtime, "tinygrad_version", lambda: "9.9.9")
    with pytest.warns(UserWarning, match=r"tinygrad 9\.9\.9 is not the version tinyclip's CPU kernels were written "
                                         r"for .*using tinygrad's default CPU kernels instead"):
        clip = tinyclip.load(tiny16[0], device=CPU(), graph_cache=False)    # see the test above
    assert not clip.model.kernels.active
    assert not any(m.weight.ndim == 3 for m in walk(clip.model) if isinstance(m, (Linear, Conv2dPatch)))
    plain = tinyclip.load(tiny16[0], device=RawDevice("CPU:CLANG"), graph_cache=False)
    ids = clip.tokenize(["a photo of a cat"])
    np.testing.assert_array_equal(clip.encode_text(ids), plain.encode_text(ids))


# ---- measured tuning ------------------------------------------------------------------------------------

def test_tuning_is_modelled_until_tune_measures_it_then_read_back(isa, tmp_path, monkeypatch):
    """A machine that `tinyclip tune` has not measured gets modelled costs (nothing compiled or timed but the
    thread hand-off); tune() measures once and keeps the result, which later processes read."""
    measured = []
    real = tuning.measure
    monkeypatch.setattr(tuning, "measure", lambda *a: measured.append(a) or real(*a))
    with Context(DEV=device("CLANG", isa)):
        modelled = tuning.machine(isa, "CPU", tmp_path / "cpu")
        assert measured == [] and not (tmp_path / "cpu").exists(), "a first answer measures nothing"
        assert modelled.tile_rows == max(r for r in isa.tile_rows if 2 * r + 3 <= isa.registers)
        assert not modelled.rows_outer and modelled.handoff_us > 0 and modelled.macs_per_us > 0
        first = tuning.tune(isa, "CPU", tmp_path / "cpu")
        again = tuning.machine(isa, "CPU", tmp_path / "cpu")
    assert len(measured) == 1 and first == again
    assert first.tile_rows in isa.tile_rows and first.handoff_us > 0 and first.macs_per_us > 0
    (file,) = (tmp_path / "cpu").glob(f"{isa.name}-*.json")
    assert oct(file.stat().st_mode & 0o777) == "0o600" and oct(file.parent.stat().st_mode & 0o777) == "0o700"


def test_a_tuning_file_others_may_write_is_not_read(isa, tmp_path, monkeypatch):
    measured = {"tile_rows": isa.tile_rows[0], "rows_outer": True, "handoff_us": 1.0, "macs_per_us": 1.0}
    monkeypatch.setattr(tuning, "measure", lambda *a: dict(measured))
    with Context(DEV=device("CLANG", isa)):
        tuning.tune(isa, "CPU", tmp_path / "cpu")
        assert tuning.machine(isa, "CPU", tmp_path / "cpu").rows_outer, "read back when it is yours alone"
        (file,) = (tmp_path / "cpu").glob("*.json")
        file.chmod(0o666)
        assert not tuning.machine(isa, "CPU", tmp_path / "cpu").rows_outer, "others may write it: modelled instead"


def test_cc_naming_gcc_is_explained_in_one_sentence(monkeypatch, tmp_path):
    """tinygrad runs $CC with clang's flags: a gcc there must give a plain reason, not gcc's error output."""
    from tinyclip_backends.cpu import compiler_problem
    gcc = tmp_path / "gcc"
    gcc.write_text("#!/bin/sh\necho 'gcc (Debian 12.2.0-14) 12.2.0'\n")
    gcc.chmod(0o755)
    monkeypatch.setenv("CC", str(gcc))
    why = compiler_problem.__wrapped__()
    assert why == (f"CC={gcc} names a compiler tinygrad's CPU device cannot use (it runs $CC with clang's flags); "
                   "unset CC, or set CC=clang, for the cpu backends")
    monkeypatch.setenv("CC", "clang")
    assert compiler_problem.__wrapped__() is None


def test_no_warning_from_the_kernel_set_on_the_tested_tinygrad(isa):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.CPUKernels(isa).active


POOL_SCRIPT = r"""
import pickle, sys
import tinygrad.engine.worker as worker
from tinyclip._tinygrad import cpu_runtime
worker.get_worker_pool()           # a compile pool made with tinygrad's initializer, as a first capture makes
cpu_runtime.use_wide_vectors()
pool = worker.get_worker_pool()
pickle.dumps(pool._initializer)    # what the pool does to start the worker that replaces one (after 16 kernels)
pool.terminate()
print("replaceable")
"""


def test_a_compile_pool_made_before_the_wide_vector_pass_is_not_left_unable_to_replace_its_workers():
    """A pool made with tinygrad's initializer could not pickle it once the pass replaced it under the same
    name: the first worker to retire was never replaced, and the next compile waited forever."""
    r = subprocess.run([sys.executable, "-c", POOL_SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "replaceable", r.stderr[-2000:]
