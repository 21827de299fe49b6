"""dtype int8 on the CPU (issue 26): the VNNI kernels against a numpy reference of the same quantisation, the
model against transformers in float32 within the int8 tolerances, the refusals, and the trust rules of the
quantised-weight store."""
import argparse
import os
import pathlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from tinygrad import Tensor

import tinyclip
from tinyclip import _tinygrad, cpu_info
from tinyclip._tinygrad import cpu_runtime, source
from tinyclip.errors import BackendError
from tinyclip.kernels.cpu import int8, int8_store, isa as isas, tuning
from tests.conftest import ROOT

DEVICE = "cpu"
COS_TOL = 0.995            # the int8 tolerance: cosine of every embedding against float32
ACT_REL_TOL = 1e-6         # the kernel's quick_gelu (a polynomial exp2) against numpy's, relative to the largest value
NOBODY = 65534
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
TEXTS = ["a photo of a cat", "a photo of a dog", "an astronaut", "", "a cup of coffee on a wooden table", "x " * 100]

ISA, _ = isas.choose("native")
PATH = int8.choose(ISA) if ISA is not None else "no x86-64 instruction set"
# Every path this CPU can run (AVX-512's and AVX2's on a CPU with both VNNI flags): the kernels of each.
RUNNABLE = [p for p in int8.PATHS if set(p.needs) <= cpu_info.flags()] if source.compiles_c("CPU") else []
runs_here = pytest.mark.skipif(isinstance(PATH, str) or not source.compiles_c("CPU"),
                               reason=f"int8 does not run on this CPU: {PATH}")
as_root = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                             reason="giving a file to another user (nobody) needs root")


# ---- the kernels, against numpy doing the same integer arithmetic ---------------------------------------

def reference(x, w, bias, residual, act=None, path=PATH):
    """What the kernels compute, in numpy: rows quantised per row, weights per channel (int8.quantise's arrays,
    unpacked), exact integer sums, one float32 rescale in the kernel's order."""
    top = np.abs(x).max(1)
    inv = np.divide(np.float32(127), top, out=np.zeros_like(top), where=top > 0)
    qx = np.clip(np.rint(x * inv[:, None]), -127, 127).astype(np.int64)
    qw, sw = int8.unpack(int8.quantise(w, path), path)
    acc = qx @ qw.astype(np.int64).T
    y = acc.astype(np.float32) * (sw[None, :] * (top / np.float32(127))[:, None])
    if bias is not None:
        y = y + bias
    if act == "quick_gelu":
        y = y / (1 + np.exp(-1.702 * y.astype(np.float64))).astype(np.float32)
    if residual is not None:
        y = y + residual
    return y.astype(np.float32)


@pytest.fixture(scope="module")
def machine():
    cpu_runtime.install()
    return tuning.machine(ISA, "CPU", None)


def _run(x, w, bias, residual, act, machine, path=PATH):
    packed = _tinygrad.from_numpy(int8.quantise(w, path), "CPU")
    t = lambda a: None if a is None else Tensor(a, device="CPU")   # noqa: E731
    return int8.linear(t(x), packed, t(bias), act, t(residual), path, machine).numpy()


@runs_here
@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
@pytest.mark.parametrize("m, n, k", [(37, 70, 45), (6, 64, 64), (64, 17, 30), (130, 200, 96)])
def test_the_kernel_equals_a_numpy_reference_of_the_same_quantisation(machine, m, n, k, path):
    """Odd rows (a last row tile past M), outputs no panel divides (a narrower last panel), K not a multiple of 4."""
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    x[3] = 0.0      # a row of zeros: scale 0, no division by zero
    bias, res = rng.standard_normal(n, dtype=np.float32), rng.standard_normal((m, n), dtype=np.float32)
    np.testing.assert_array_equal(_run(x, w, bias, res, None, machine, path), reference(x, w, bias, res, path=path))
    np.testing.assert_array_equal(_run(x, w, None, None, None, machine, path), reference(x, w, None, None, path=path))


@runs_here
def test_the_kernels_activations_follow_numpy(machine):
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((20, 48), dtype=np.float32), rng.standard_normal((40, 48), dtype=np.float32)
    bias = rng.standard_normal(40, dtype=np.float32)
    want = reference(x, w, bias, None, "quick_gelu")
    got = _run(x, w, bias, None, "quick_gelu", machine)
    assert np.abs(got - want).max() <= ACT_REL_TOL * np.abs(want).max()
    np.testing.assert_array_equal(_run(x, w, bias, None, "relu", machine), np.maximum(reference(x, w, bias, None), 0))


def test_the_weights_layout_holds_the_per_channel_quantisation():
    """Unpacked, the stored bytes are rint(W / scale) per output channel, the scales max|W| / 127, K recorded."""
    path = int8.PATHS[-1]      # the layout is numpy's: any path, whatever this CPU runs
    rng = np.random.default_rng(2)
    w = rng.standard_normal((19, 13), dtype=np.float32)
    w[5] = 0.0
    packed = int8.quantise(w, path)
    assert packed.dtype == np.uint8 and packed.shape == int8.stored_shape(19, 13, path)
    q, scales = int8.unpack(packed, path)
    np.testing.assert_array_equal(scales, np.abs(w).max(1) / np.float32(127))
    assert np.abs(q).max() == 127 and not q[5].any()
    err = np.abs(int8.dequantise(packed, path) - w)
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()


# ---- the model, against transformers in float32 ----------------------------------------------------------

def _cosines(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@runs_here
def test_int8_embeddings_are_within_the_tolerance_of_float32(tiny, tmp_path, monkeypatch):
    """Every tiny configuration (quick_gelu in the kernel, exact and tanh GELU after it, odd widths)."""
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path))
    model = tinyclip.load(tiny.folder, device=DEVICE, dtype="int8")
    assert model.dtype == "int8" and model.model.kernels.linear_dtype == "int8"
    ids, pixels = model.tokenize(TEXTS), model.preprocess([Image.open(p) for p in IMAGES])
    with torch.no_grad():
        img = tiny.torch_model.get_image_features(pixel_values=torch.from_numpy(pixels))
        txt = tiny.torch_model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    img, txt = (getattr(t, "pooler_output", t).numpy() for t in (img, txt))
    ours_img, ours_txt = model.encode_image(pixels), model.encode_text(ids)
    assert _cosines(ours_img, img).min() >= COS_TOL and _cosines(ours_txt, txt).min() >= COS_TOL
    # and it is int8, not float32 under the name: the embeddings are not float32's to its rounding
    assert np.abs(ours_txt - txt).max() > 1e-4 * np.abs(txt).max()


# ---- refusals --------------------------------------------------------------------------------------------

def _cpu(flags, monkeypatch, isa="native"):
    from tinyclip_backends.cpu import CPU
    monkeypatch.setenv("TINYCLIP_CPU_ISA", isa)
    monkeypatch.setattr(cpu_info, "flags", lambda: frozenset(flags))
    return CPU()


AVX512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"}


@pytest.mark.parametrize("isa, flags, missing", [("native", AVX512, "avx512_vnni"),
                                                 ("avx2", AVX512 | {"avx512_vnni"}, "avx_vnni"),
                                                 ("native", {"avx2", "fma"}, "avx_vnni")])
def test_a_cpu_without_vnni_refuses_int8_naming_the_flag(monkeypatch, tiny_quick, isa, flags, missing):
    backend = _cpu(flags, monkeypatch, isa)
    assert "int8" not in backend.usable_dtypes and "float32" in backend.usable_dtypes
    with pytest.raises(BackendError, match=f"does not run int8: dtype int8 needs the CPU flag {missing}") as e:
        backend.check_dtype("int8")
    assert "\n" not in str(e.value)
    with pytest.raises(BackendError, match=missing):
        tinyclip.load(tiny_quick.folder, device=backend, dtype="int8")


def test_the_command_line_names_the_missing_flag(monkeypatch):
    from tinyclip import cli, registry
    backend = _cpu(AVX512, monkeypatch)
    monkeypatch.setattr(registry, "select", lambda device: backend)
    with pytest.raises(BackendError, match=r"^--dtype int8: backend cpu \(CPU\) does not run int8: dtype int8 needs the "
                                           r"CPU flag avx512_vnni ") as e:
        cli.check_device(argparse.Namespace(device="cpu", dtype="int8"))
    assert "\n" not in str(e.value)


@runs_here
def test_cpu_llvm_and_other_backends_refuse_int8():
    from tinyclip_backends.cpu import CPULLVM
    from tinyclip.registry import Backend
    llvm = CPULLVM()
    if llvm.available:
        with pytest.raises(BackendError, match="cpu-llvm .* does not run int8: dtype int8 needs kernels compiled "
                                               "from C by clang"):
            llvm.check_dtype("int8")

    class Accelerator(Backend):
        name, device, dtypes = "accel", "CPU", ("float32", "float16")
    with pytest.raises(BackendError, match=r"backend accel \(CPU\) does not run int8: int8 linear layers run only in "
                                           r"tinyclip.s CPU kernels"):
        Accelerator().check_dtype("int8")


def test_an_untested_tinygrad_refuses_int8(monkeypatch):
    from tinyclip.kernels.cpu import int8_set
    monkeypatch.setattr(cpu_runtime, "tinygrad_version", lambda: "9.9.9")
    isa = isas.BY_NAME["avx512"]
    assert "written for tinygrad" in int8_set.problem(isa, True, frozenset(AVX512 | {"avx512_vnni"}))


# ---- the quantised-weight store ----------------------------------------------------------------------------

def _store_files(cache):
    return sorted((pathlib.Path(cache) / "cpu" / int8_store.SUBDIR).glob("*.npz"))


@pytest.fixture
def stored(tiny_quick, tmp_path, monkeypatch):
    """A cache folder holding tiny-quick's quantised weights, and the text embeddings they gave."""
    if isinstance(PATH, str) or not source.compiles_c("CPU"):
        pytest.skip(f"int8 does not run on this CPU: {PATH}")
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="int8")
    assert _store_files(tmp_path / "cache") == []       # a tower's weights are arranged on its first use
    want = model.encode_text(TEXTS[:2])
    files = _store_files(tmp_path / "cache")
    assert len(files) == 1 and (files[0].stat().st_mode & 0o777) == 0o600     # the text tower's
    return files[0], want


def _quantising(monkeypatch) -> list:
    calls = []
    real = int8.quantise
    monkeypatch.setattr(int8, "quantise", lambda *a: calls.append(1) or real(*a))
    return calls


def test_a_second_load_reads_the_quantised_weights(stored, tiny_quick, monkeypatch):
    path, want = stored
    calls = _quantising(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", int8_store.QuantisedWeightsWarning)
        model = tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="int8")
        np.testing.assert_array_equal(model.encode_text(TEXTS[:2]), want)
    assert calls == []


def _refused(tiny_quick, monkeypatch, match, want):
    calls = _quantising(monkeypatch)
    with pytest.warns(int8_store.QuantisedWeightsWarning, match=match):
        model = tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="int8")
        np.testing.assert_array_equal(model.encode_text(TEXTS[:2]), want)
    assert calls, "the weights were not quantised again"


def test_a_damaged_file_is_quantised_again_and_replaced(stored, tiny_quick, monkeypatch):
    path, want = stored
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _refused(tiny_quick, monkeypatch, "not a readable weights file", want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", int8_store.QuantisedWeightsWarning)
        calls = _quantising(monkeypatch)
        tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="int8").encode_text(TEXTS[:2])   # the replaced file
    assert calls == []


def test_a_file_of_other_weights_is_not_used(stored, tiny_quick, monkeypatch):
    path, want = stored
    with np.load(path) as arrays:
        other = {name: arrays[name] for name in arrays.files}
    other["w0"] = np.zeros_like(other["w0"])
    other["key"] = np.array('{"checkpoint": "someone else"}')
    with open(path, "wb") as f:
        np.savez(f, **other)
    _refused(tiny_quick, monkeypatch, "other weights than its name says", want)


def test_a_pickle_in_the_file_is_never_loaded(stored, tiny_quick, monkeypatch):
    path, want = stored
    with np.load(path) as arrays:
        other = {name: arrays[name] for name in arrays.files}
    other["w0"] = np.array([object()], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **other)
    _refused(tiny_quick, monkeypatch, "not a readable weights file .*allow_pickle", want)


def test_a_file_others_may_write_is_not_read(stored, tiny_quick, monkeypatch):
    path, want = stored
    os.chmod(path, 0o666)
    _refused(tiny_quick, monkeypatch, "writable by group or others", want)


def test_a_symbolic_link_is_not_followed(stored, tiny_quick, monkeypatch, tmp_path):
    path, want = stored
    real = tmp_path / "elsewhere.npz"
    os.replace(path, real)
    path.symlink_to(real)
    _refused(tiny_quick, monkeypatch, "a symbolic link", want)


@as_root
def test_a_file_of_another_user_is_not_read(stored, tiny_quick, monkeypatch):
    path, want = stored
    os.chown(path, NOBODY, NOBODY)
    _refused(tiny_quick, monkeypatch, f"owned by uid {NOBODY}", want)


def test_no_store_without_the_caches(tiny_quick, tmp_path, monkeypatch):
    if isinstance(PATH, str) or not source.compiles_c("CPU"):
        pytest.skip(f"int8 does not run on this CPU: {PATH}")
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path))
    tinyclip.load(tiny_quick.folder, device=DEVICE, dtype="int8", graph_cache=False).encode_text(TEXTS[:2])
    assert _store_files(tmp_path) == []


@runs_here
def test_one_tower_after_the_other_keeps_the_state_dict_the_checkpoints(tiny_quick):
    """The int8 set keeps the last input's quantised rows between q, k and v, but never as a tensor: a
    tower read after the other has run (towers.py) still finds exactly the checkpoint's keys."""
    from tinygrad.nn.state import get_state_dict
    model = tinyclip.load(tiny_quick.folder, device="cpu", dtype="int8")
    keys = set(get_state_dict(model.runner.model))
    model.encode_text(["a cat"])
    assert set(get_state_dict(model.runner.model)) == keys
    model.model        # reads the image tower after the text tower ran
    assert set(get_state_dict(model.runner.model)) == keys
