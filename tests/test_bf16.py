"""dtype="bfloat16": the cpu backend's linear layers in bfloat16 (kernels/cpu/bf16.py), against float32 and
transformers within the issue's tolerances, and its refusals where it cannot run."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tinygrad import Tensor

import tinyclip
from tests.checkpoints import build_checkpoint, clip_config
from tinyclip import cpu_info, registry
from tinyclip._tinygrad import source
from tinyclip.errors import BackendError
from tinyclip.kernels import TINYGRAD
from tinyclip.kernels.cpu import CPUKernels, bf16, isa as isas
from tinyclip.kernels.cpu.machine import Machine

# The tolerances bfloat16 is held to (README, validate.py): every embedding's cosine with float32's, and the
# texts ranked in the same order by every image's logits.
COSINE = 0.999
# bf16.linear against numpy on the same bfloat16-rounded inputs: the products are exact, the float32 sums'
# order differs.
KERNEL_RTOL = 2e-5

runs_here = pytest.mark.skipif(
    bf16.FLAG not in cpu_info.flags() or not source.compiles_c("CPU") or isas.choose("native")[0] is None
    or isas.choose("native")[0].lanes < bf16.LANES, reason=f"this CPU has no {bf16.FLAG} (or no clang)")

TEXTS = ["a photo of a cat", "a photo of a dog", "an astronaut riding a horse", "a cup of coffee",
         "two birds on a wire"]


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny checkpoint whose widths fill the kernel's vectors of 16 (as every released CLIP's do), so
    that every linear layer but the projections runs in bfloat16."""
    folder = tmp_path_factory.mktemp("tiny16")
    model = build_checkpoint(folder, clip_config(text=(64, 128, 2, 4), vision=(64, 96, 2, 4, 32, 8), proj=48),
                             seed=5, perturb=0.02)
    return folder, model


def run_cli(cwd, *args, model, env=None):
    """`tinyclip ARGS --model MODEL --device cpu` in a new process."""
    cmd = [sys.executable, "-m", "tinyclip", *args, "--model", str(model), "--device", "cpu"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_kernel_matches_numpy_on_bfloat16_inputs():
    """vdpbf16ps and, where the CPU has it, AMX. Odd inputs (a zero-padded pair), one-vector and two-vector
    panels, rows past the last tile, the epilogue (bias, quick_gelu, residual), and panels split between
    two threads."""
    if not (bf16.FLAG in cpu_info.flags() and source.compiles_c("CPU")):
        pytest.skip(f"this CPU has no {bf16.FLAG} (or no clang)")
    rng = np.random.default_rng(0)
    machine = Machine(isas.BY_NAME["avx512"], 48 << 10, 2 << 20, threads=2, tile_rows=4, rows_outer=False,
                      handoff_us=1e-6, macs_per_us=1.0)
    cases = [(7, 27, 48, True, True, False), (13, 64, 64, False, False, False), (5, 33, 16, True, False, False)]
    if bf16.amx():     # the AMX tiles too (inputs a multiple of 32, panels of 32; rows past a block of 32)
        cases += [(13, 64, 64, False, False, True), (40, 96, 64, True, True, True), (33, 64, 160, True, True, True)]
    cases += [(33, 64, 160, True, True, False)]
    # an L2 of 16 KiB holds groups of 2 panels of 64 inputs (8 KiB each), so (33, 64, 160)'s 5 panels, split 3 + 2
    # between the threads, make groups that end inside a thread's share
    small_l2 = Machine(isas.BY_NAME["avx512"], 48 << 10, 16 << 10, threads=2, tile_rows=4, rows_outer=False,
                       handoff_us=1e-6, macs_per_us=1.0)
    for M, K, N, gelu, with_res, amx in cases:
        shaped_by = small_l2 if N == 160 else machine
        x = rng.standard_normal((M, K), dtype=np.float32)
        w = rng.standard_normal((N, K), dtype=np.float32) / np.sqrt(K)
        b = rng.standard_normal(N, dtype=np.float32)
        res = rng.standard_normal((M, N), dtype=np.float32)
        pairs = bf16.to_pairs(Tensor(w, device="CPU").realize())
        np.testing.assert_array_equal(bf16.from_pairs(pairs)[:, :K], bf16.from_bf16_bits(bf16.to_bf16_bits(w)))
        out = bf16.linear(Tensor(x, device="CPU").realize(), pairs, Tensor(b, device="CPU").realize(), gelu,
                          Tensor(res, device="CPU").realize() if with_res else None, shaped_by, use_amx=amx).numpy()
        xq, wq = (bf16.from_bf16_bits(bf16.to_bf16_bits(a)).astype(np.float64) for a in (x, w))
        want = xq @ wq.T + b
        if gelu:
            want = want / (1 + np.exp(-1.702 * want))
        want = want + res if with_res else want
        np.testing.assert_allclose(out, want, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * np.abs(want).max())


@pytest.mark.slow      # two models' image and text graphs compiled: 10 to 35 s on a busy 2-core machine
@runs_here
def test_bfloat16_within_tolerance_of_float32_and_transformers(tiny16):
    folder, ref = tiny16
    exact = tinyclip.load(folder, device="cpu", graph_cache=False)
    low = tinyclip.load(folder, device="cpu", dtype="bfloat16", graph_cache=False)
    assert low.dtype == "bfloat16" and "bfloat16" in repr(low)
    layer = low.model.vision_model.encoder.layers[0]
    assert layer.mlp.fc1.weight.dtype.name == "int" and layer.self_attn.q_proj.weight.dtype.name == "int"  # pairs
    assert low.model.text_projection.weight.dtype.name == "float"       # the final projection stays float32
    assert low.model.kernels.key() != exact.model.kernels.key()         # graph files apart

    images = list(np.random.default_rng(1).integers(0, 256, (4, 40, 48, 3), dtype=np.uint8))
    pixels = low.preprocess(images)
    ids = low.tokenize(TEXTS)
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=torch.from_numpy(pixels))
        ref_txt = ref.get_text_features(input_ids=torch.from_numpy(ids))
        ref_img, ref_txt = (getattr(t, "pooler_output", t).numpy() for t in (ref_img, ref_txt))
    img, txt = low.encode_image(pixels), low.encode_text(ids)
    img32, txt32 = exact.encode_image(pixels), exact.encode_text(ids)
    for ours, f32, theirs in ((img, img32, ref_img), (txt, txt32, ref_txt)):
        assert cosines(ours, f32).min() >= COSINE and cosines(ours, theirs).min() >= COSINE
        assert not np.allclose(ours, f32, rtol=1e-6, atol=1e-7)          # bfloat16 really ran
    logits, ref_logits = low.logits_from_embeddings(img, txt), exact.logits_from_embeddings(img32, txt32)
    np.testing.assert_array_equal(np.argsort(-logits, 1), np.argsort(-ref_logits, 1))


@pytest.mark.slow      # two command-line runs, each compiling its text graph: 6 to 12 s on a busy 2-core machine
@runs_here
def test_bfloat16_quick_gelu_checkpoint_from_the_command_line(tiny_quick, tmp_path):
    """tiny-quick's widths (40, 72) do not fill vectors of 16: those layers keep their float32 kernels, the
    others (48, 80: the text tower) run bfloat16; the embeddings stay within the tolerance."""
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    run = run_cli(tmp_path, "embed", "--texts", "texts.txt", "--out", "low.npz", "--dtype", "bfloat16",
                  model=tiny_quick.folder)
    assert run.returncode == 0, run.stderr
    run = run_cli(tmp_path, "embed", "--texts", "texts.txt", "--out", "exact.npz", model=tiny_quick.folder)
    assert run.returncode == 0, run.stderr
    low, exact = np.load(tmp_path / "low.npz"), np.load(tmp_path / "exact.npz")
    assert str(low["dtype"]) == "bfloat16" and str(exact["dtype"]) == "float32"
    assert cosines(low["embeddings"], exact["embeddings"]).min() >= COSINE


def test_refused_without_the_cpu_flag(monkeypatch, tiny_quick):
    flags = cpu_info.flags() - {bf16.FLAG}
    monkeypatch.setattr(cpu_info, "flags", lambda: flags)
    backend = registry.select("cpu")
    if backend.kernel_set() is TINYGRAD:
        pytest.skip("no tiled CPU kernels on this CPU")
    with pytest.raises(BackendError, match=bf16.FLAG) as refused:
        tinyclip.load(tiny_quick.folder, device="cpu", dtype="bfloat16")
    assert "\n" not in str(refused.value) and "float32" in str(refused.value)


def test_refused_where_avx2_is_forced(tiny_quick, tmp_path):
    """TINYCLIP_CPU_ISA=avx2 stands for a CPU without AVX-512: the command line refuses in one line naming the flag."""
    if "avx2" not in [i.name for i in isas.runnable()]:
        pytest.skip("this CPU runs no AVX2")
    (tmp_path / "texts.txt").write_text("a cat\n")
    run = run_cli(tmp_path, "embed", "--texts", "texts.txt", "--out", "x.npz", "--dtype", "bfloat16",
                  model=tiny_quick.folder, env={"TINYCLIP_CPU_ISA": "avx2"})
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and bf16.FLAG in lines[0] and "--dtype bfloat16" in lines[0], run.stderr
    assert not (tmp_path / "x.npz").exists()


def test_refused_by_the_plain_set_and_other_backends():
    with pytest.raises(BackendError, match="only in tinyclip's CPU kernels"):
        TINYGRAD.with_linear_dtype("bfloat16")
    if bf16.FLAG in cpu_info.flags():    # the LLVM renderer (backend cpu-llvm) takes no C source
        llvm = CPUKernels(isas.BY_NAME["avx512"], c_source=False)
        assert "use the cpu backend" in llvm.linear_dtype_problem("bfloat16")
    for backend in registry.registered():
        if backend.name == "cpu" or not backend.available:
            continue
        refusal = f"backend {backend.name} .* does not run bfloat16: .*the cpu backend"
        with pytest.raises(BackendError, match=refusal) as e:
            backend.check_dtype("bfloat16")
        assert "\n" not in str(e.value)
        assert "bfloat16" not in backend.usable_dtypes


def test_unknown_dtype_names_the_choices(tiny_quick):
    with pytest.raises(tinyclip.UsageError, match="bfloat16"):
        tinyclip.load(tiny_quick.folder, device="cpu", dtype="bf8")


@runs_here
def test_q_k_and_v_share_one_conversion_and_the_state_dict_stays_the_checkpoints(tiny_quick, monkeypatch):
    """q, k and v read the same input: it is rounded to bfloat16 pairs once a layer (4 conversions a layer:
    q/k/v, out_proj, fc1, fc2, against 6 converting each layer's own), to the same embeddings; the set keeps
    it as graph nodes, never as a tensor, so a tower read after the other has run still finds exactly the
    checkpoint's keys."""
    from tinygrad.nn.state import get_state_dict
    texts, calls, real = ["a cat", "two dogs"], [], bf16.to_pairs_of
    monkeypatch.setattr(bf16, "to_pairs_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = tinyclip.load(tiny_quick.folder, device="cpu", dtype="bfloat16", graph_cache=False)
    layers = shared.config.text_config.num_hidden_layers
    keys = set(get_state_dict(shared.runner.model))
    got = shared.encode_text(texts)
    assert len(calls) == 4 * layers
    assert set(get_state_dict(shared.runner.model)) == keys
    separate = tinyclip.load(tiny_quick.folder, device="cpu", dtype="bfloat16", graph_cache=False)
    monkeypatch.setattr(separate.runner.model.kernels, "_once_per_input", lambda x, what, make: make())   # no sharing
    calls.clear()
    np.testing.assert_array_equal(separate.encode_text(texts), got)
    assert len(calls) == 6 * layers
    shared.model        # reads the image tower after the text tower ran
    assert set(get_state_dict(shared.runner.model)) == keys
