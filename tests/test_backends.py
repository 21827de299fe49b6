"""Backends: discovery through entry points, selection, the listing error, `tinyclip backends`,
and parity with transformers on every backend that runs here, in float32 and float16."""
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import torch
from PIL import Image

import tinyclip
from tinyclip import registry
from tinyclip.registry import Backend
from tinyclip.errors import BackendError
from tinyclip.kernels.cpu.isa import runnable
from tests.conftest import ROOT

# float32: as tests/test_parity.py. float16 weights and activations, LayerNorm and softmax in float32:
REL_TOL = {"float32": 1e-5, "float16": 1e-2}          # max |ours - theirs| / max |theirs|
COS_TOL = {"float32": 1 - 1e-6, "float16": 0.9999}    # per-row cosine, at least
# float32 with TF32 matmuls: inputs rounded to float16's 10-bit mantissa, sums in float32 (validate.py's bounds)
TF32_REL_TOL, TF32_COS_TOL = REL_TOL["float16"], COS_TOL["float16"]
BUILTIN = ("cpu", "cpu-llvm", "cuda", "metal", "nv", "opencl")
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))[:3]
TEXTS = ["a photo of a cat", "", "RÉSUMÉ of 3 horses & 2 rockets!! 🚀"]
PLUGIN_PATH = ROOT / "tests" / "plugin"       # a third-party backend: two *.dist-info folders and modules
TINYCLIP = [sys.executable, "-m", "tinyclip"]


def by_name(name: str) -> Backend:
    return next(b for b in registry.registered() if b.name == name)


def require(name: str, dtype: str = "float32") -> Backend:
    b = by_name(name)
    if not b.available:
        pytest.skip(f"{name} is not available here: {b.unavailable}")
    if dtype not in b.usable_dtypes:
        pytest.skip(f"{name} does not run {dtype} here")
    return b


_loaded = {}


def loaded(ck, device, dtype="float32"):
    """One model per (checkpoint, device, dtype) for this module: each load compiles kernels."""
    key = (str(ck.folder), device, dtype)
    if key not in _loaded:
        _loaded[key] = tinyclip.load(ck.folder, device=device, dtype=dtype)
    return _loaded[key]


@pytest.fixture(scope="module")
def inputs(tiny_quick):
    """Token ids, pixel values and transformers' embeddings of them (the oracle)."""
    model = loaded(tiny_quick, "cpu")
    ids, pixels = model.tokenize(TEXTS), model.preprocess([Image.open(p) for p in IMAGES])
    m = tiny_quick.torch_model
    with torch.no_grad():
        img = m.get_image_features(pixel_values=torch.from_numpy(pixels))
        txt = m.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    features = [getattr(o, "pooler_output", o).numpy() for o in (img, txt)]
    return ids, pixels, *features


def errors(ours, theirs):
    """(max relative error, min cosine) of two (N, D) arrays."""
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    return float(rel), float(cos.min())


# ---- discovery -----------------------------------------------------------------------------------

def test_builtin_backends_register_through_the_entry_point_group():
    eps = {ep.name: ep.value for ep in entry_points(group=registry.GROUP)}
    for name in BUILTIN:
        assert eps[name].startswith("tinyclip_backends."), eps
    assert {b.name for b in registry.registered()} >= set(BUILTIN)


def test_every_backend_declares_what_the_interface_asks():
    for b in registry.registered():
        assert b.name and b.device and b.description, b
        assert b.default_dtype in b.dtypes, b
        assert set(b.dtypes) <= {"float32", "float16", "bfloat16", "int8"}, b
        assert b.available or b.unavailable.strip(), f"{b.name} is unavailable without a reason"


def test_dtypes_are_checked_by_running_where_the_backend_is_available():
    for b in registry.registered():
        if b.available:
            assert "float32" in b.usable_dtypes and set(b.usable_dtypes) <= set(b.dtypes), b
        else:
            assert b.usable_dtypes == (), b


# What the subprocess runs: load through the plugin, save the embeddings, report what it found.
PLUGIN_USER = """
import json, sys, numpy as np, tinyclip
from tinyclip import registry
folder, work = sys.argv[1:]
model = tinyclip.load(folder, device="mycpu")
np.save(f"{work}/txt.npy", model.encode_text(np.load(f"{work}/ids.npy")))
np.save(f"{work}/img.npy", model.encode_image(np.load(f"{work}/pixels.npy")))
print(json.dumps({"device": model.device, "kernels": model.model.kernels.name,
                  "backends": {b.name: b.unavailable for b in registry.registered()}}))
"""


def _env_with_plugin():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN_PATH), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.mark.slow   # compiles both towers, several times: about a minute
def test_a_third_party_backend_installed_by_its_dist_info_loads_models(tiny_quick, inputs, tmp_path):
    """tests/plugin holds what pip would install for a plugin package: *.dist-info with METADATA and
    entry_points.txt, and the module. A subprocess with it on sys.path must find "mycpu" (and list,
    not crash on, a plugin that fails to import) and compute the built-in cpu backend's embeddings."""
    ids, pixels, _, _ = inputs
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "pixels.npy", pixels)
    done = subprocess.run([sys.executable, "-c", PLUGIN_USER, str(tiny_quick.folder), str(tmp_path)],
                          env=_env_with_plugin(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["device"] == "mycpu"
    assert got["kernels"] == ("mycpu-kernels" if runnable() else "tinygrad")    # the plugin's own kernel set
    assert got["backends"]["mycpu"] is None
    assert "failed to load" in got["backends"]["broken"] and "broken on purpose" in got["backends"]["broken"]
    assert set(BUILTIN) <= set(got["backends"])
    builtin = loaded(tiny_quick, "cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "txt.npy"), builtin.encode_text(ids))
    np.testing.assert_array_equal(np.load(tmp_path / "img.npy"), builtin.encode_image(pixels))


def test_the_third_party_plugin_is_invisible_to_this_process():
    assert "mycpu" not in {b.name for b in registry.registered()}


# ---- selection -----------------------------------------------------------------------------------

def test_unknown_device_error_is_one_line_with_every_backend_and_its_status_in_its_table():
    with pytest.raises(BackendError) as e:
        registry.select("nosuchdevice")
    msg = e.value.table
    assert "unknown device 'nosuchdevice'" in str(e.value) and "\n" not in str(e.value)
    assert all(b.name in str(e.value) for b in registry.registered() if b.available)
    lines = msg.splitlines()
    for b in registry.registered():
        row = next((line for line in lines if line.split()[:2] == [b.name, b.device]), None)
        assert row is not None, f"{b.name} missing from:\n{msg}"
        assert row.endswith("available" if b.available else f"unavailable: {b.unavailable}"), row


def test_load_with_unknown_device_raises_the_listing(tiny_quick):
    with pytest.raises(BackendError, match=r"unknown device 'nosuchdevice'.*backends that run here: .*cpu"):
        tinyclip.load(tiny_quick.folder, device="nosuchdevice")


@pytest.mark.parametrize("name", ["cuda", "metal"])
def test_unavailable_backend_error_gives_its_reason(name, tiny_quick):
    b = by_name(name)
    if b.available:
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendError) as e:
        tinyclip.load(tiny_quick.folder, device=name)
    assert f"device {name!r} ({name}) is not available: {b.unavailable}" in str(e.value)
    assert "cpu" in str(e.value)


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal may run here")
def test_metal_says_it_needs_macos():
    assert "needs macOS" in by_name("metal").unavailable


@pytest.mark.parametrize("device, name", [("CPU", "cpu"), ("cpu", "cpu"), ("CPU:0", "cpu"), ("CPU:CLANG", "cpu"),
                                          ("CPU:LLVM", "cpu-llvm"), ("cpu:llvm", "cpu-llvm"),
                                          ("CL", "opencl"), ("CL:0", "opencl"), ("OpenCL", "opencl")])
def test_names_and_raw_tinygrad_devices_select_their_backend(device, name):
    require(name)
    assert registry.select(device).name == name


def test_raw_device_with_a_renderer_compiles_with_that_renderer():
    """tinygrad 0.14 reads the renderer from DEV, not from the device string: "CPU:X86" must set it."""
    from tinygrad import Device
    chosen = registry._choose("CPU:X86", registry.registered())
    assert (chosen.name, chosen.device) == ("CPU:X86", "CPU")
    with chosen.context():
        assert type(Device["CPU"].renderer).__name__ == "X86Renderer"


def test_raw_device_of_an_unknown_family_is_unknown():
    with pytest.raises(BackendError, match="unknown device 'NOSUCH:1'"):
        registry.select("NOSUCH:1")


def test_each_backend_compiles_with_its_own_renderer():
    from tinygrad import Device
    for name, renderer in [("cpu", "ClangRenderer"), ("cpu-llvm", "CPULLVMRenderer")]:
        with require(name).context():
            assert type(Device["CPU"].renderer).__name__ == renderer


def test_default_is_the_native_cpu_backend_not_opencl_on_the_cpu(tiny_quick):
    accelerators = [b.name for b in registry.registered() if b.available and b.priority > by_name("cpu").priority]
    if accelerators:
        pytest.skip(f"accelerators available here: {accelerators}")
    require("cpu")
    assert registry.select(None).name == "cpu"
    assert tinyclip.load(tiny_quick.folder).device == "cpu"


def test_opencl_on_a_cpu_ranks_below_the_cpu_backends():
    cl = require("opencl")
    if cl.device_info[1] != "CPU":
        pytest.skip(f"the OpenCL device here is a {cl.device_info[1]}")
    assert cl.priority < by_name("cpu-llvm").priority < by_name("cpu").priority


def test_model_device_names_the_backend(tiny_quick):
    require("cpu")
    model = tinyclip.load(tiny_quick.folder, device="CPU")
    assert model.device == "cpu" and model.backend.device == "CPU"


class Float32Only(Backend):
    name, device, description = "f32-only", "CPU", "a backend without float16"

    def context(self):
        return by_name("cpu").context()


def test_dtype_a_backend_does_not_declare_is_an_error(tiny_quick):
    with pytest.raises(BackendError, match=r"backend f32-only \(CPU\) does not run float16; it runs float32"):
        tinyclip.load(tiny_quick.folder, device=Float32Only(), dtype="float16")


def test_declared_dtype_that_fails_here_is_an_error(tiny_quick, monkeypatch):
    from tinyclip import _tinygrad
    monkeypatch.setattr(_tinygrad, "supports_half", lambda device, context=None: False)
    fresh = type(by_name("cpu"))()     # the registered instance has its dtypes checked already
    assert "float32" in fresh.usable_dtypes and "float16" not in fresh.usable_dtypes
    with pytest.raises(BackendError, match=r"does not run float16 here \(a float16 test kernel failed\)"):
        tinyclip.load(tiny_quick.folder, device=fresh, dtype="float16")


def test_unknown_dtype_name_is_an_error(tiny_quick):
    with pytest.raises(ValueError, match="dtype 'int4' is not supported; use one of float32, float16, bfloat16"):
        tinyclip.load(tiny_quick.folder, device="cpu", dtype="int4")


def test_a_backend_instance_is_used_as_given(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=Float32Only())
    assert model.device == "f32-only"


# ---- parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", BUILTIN)
def test_backend_matches_transformers(name, dtype, tiny_quick, inputs):
    require(name, dtype)
    ids, pixels, img, txt = inputs
    model = loaded(tiny_quick, name, dtype)
    assert model.dtype == dtype
    for what, ours, theirs in [("image", model.encode_image(pixels), img), ("text", model.encode_text(ids), txt)]:
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        rel, cos = errors(ours, theirs)
        print(f"{name} {dtype} {what}: max relative error {rel:.3g}, 1 - min cosine {1 - cos:.3g}")
        assert rel <= REL_TOL[dtype], f"{name} {dtype} {what} embeddings: relative error {rel:.3g} > {REL_TOL[dtype]}"
        assert cos >= COS_TOL[dtype], f"{name} {dtype} {what} embeddings: cosine {cos} < {COS_TOL[dtype]}"


@pytest.mark.parametrize("name", ["cuda", "nv"])
def test_tf32_stays_within_its_tolerance_and_takes_effect(name, tiny_quick, inputs):
    """allow_tf32 on NVIDIA: within TF32's bounds of transformers, and not bit-equal to exact float32
    (which would mean the tensor cores were not used). Runs on a GPU machine only (benchmarks/gpu/check.sh)."""
    require(name)
    ids, pixels, img, txt = inputs
    fast = tinyclip.load(tiny_quick.folder, device=name, allow_tf32=True)
    exact = loaded(tiny_quick, name)
    assert fast.tf32 and not exact.tf32
    for what, ours, theirs, plain in [("image", fast.encode_image(pixels), img, exact.encode_image(pixels)),
                                      ("text", fast.encode_text(ids), txt, exact.encode_text(ids))]:
        rel, cos = errors(ours, theirs)
        print(f"{name} tf32 {what}: max relative error {rel:.3g}, 1 - min cosine {1 - cos:.3g}")
        assert rel <= TF32_REL_TOL and cos >= TF32_COS_TOL, f"{name} tf32 {what}: {rel:.3g}, cosine {cos}"
        assert not np.array_equal(ours, plain), f"{name} tf32 {what}: bit-equal to exact float32"


def test_tf32_where_it_cannot_apply_warns_and_stays_exact(tiny_quick, inputs):
    ids, pixels, _, _ = inputs
    with pytest.warns(UserWarning, match="allow_tf32 has no effect on backend cpu: it has no TF32 tensor cores"):
        model = tinyclip.load(tiny_quick.folder, device="cpu", allow_tf32=True)
    assert not model.tf32 and "TF32" not in repr(model)
    exact = loaded(tiny_quick, "cpu")
    np.testing.assert_array_equal(model.encode_image(pixels), exact.encode_image(pixels))
    np.testing.assert_array_equal(model.encode_text(ids), exact.encode_text(ids))


def tf32_cpu():
    """The cpu backend, declaring TF32 tensor cores it does not have (ALLOW_TF32 changes nothing there)."""
    class TF32Backend(type(by_name("cpu"))):
        tf32 = True
    return TF32Backend()


def test_tf32_on_a_float16_model_warns(tiny_quick):
    with pytest.warns(UserWarning, match="allow_tf32 has no effect on a float16 model"):
        model = tinyclip.load(tiny_quick.folder, device=tf32_cpu(), dtype="float16", allow_tf32=True)
    assert not model.tf32


def test_tf32_graphs_are_cached_apart_from_exact_ones(tiny_quick):
    """A backend with TF32 compiles under ALLOW_TF32; its graphs get their own cache key."""
    model = tinyclip.load(tiny_quick.folder, device=tf32_cpu(), allow_tf32=True)
    assert model.tf32 and repr(model).endswith("with TF32 matmuls>")
    exact = loaded(tiny_quick, "cpu")
    assert model.runner.graphs.key(("image", 1))["tf32"] is True
    assert exact.runner.graphs.key(("image", 1))["tf32"] is False
    assert model.runner.graphs.path(("image", 1)) != exact.runner.graphs.path(("image", 1))
    from tinygrad.helpers import ALLOW_TF32
    with model.runner.context():
        assert ALLOW_TF32.value == 1
    with exact.runner.context():
        assert ALLOW_TF32.value == 0


@pytest.mark.parametrize("value", [1, "yes", None])
def test_allow_tf32_must_be_true_or_false(tiny_quick, value):
    with pytest.raises(tinyclip.UsageError, match=r"allow_tf32 must be True or False, got"):
        tinyclip.load(tiny_quick.folder, device="cpu", allow_tf32=value)


# ---- tinyclip backends ---------------------------------------------------------------------------

def test_cli_json_describes_every_backend():
    done = subprocess.run([*TINYCLIP, "backends", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert set(rows) == {b.name for b in registry.registered()}
    for b in registry.registered():
        r = rows[b.name]
        assert (r["device"], r["available"], r["reason"]) == (b.device, b.available, b.unavailable)
        assert (r["default_dtype"], r["description"]) == (b.default_dtype, b.description)
        assert r["dtypes"] == list(b.usable_dtypes if b.available else b.dtypes)
        assert r["kernels"] == (b.kernel_set().describe() if b.available else None)
    assert [name for name, r in rows.items() if r["default"]] == [registry.select(None).name]


def test_cli_table_shows_each_backend_and_why_not():
    done = subprocess.run([*TINYCLIP, "backends"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[0].split() == ["NAME", "DEVICE", "AVAILABLE", "DEFAULT", "DTYPE", "DTYPES", "DESCRIPTION"]
    for b in registry.registered():
        row = next(line for line in out.splitlines() if line[2:].split()[:1] == [b.name])
        assert row[2:].split()[:3] == [b.name, registry.shown_device(b), "yes" if b.available else "no"], row
        if not b.available:
            assert f"why not: {b.unavailable}" in out
    assert f"* the default (device=None): {registry.select(None).name}" in out


def test_cli_lists_third_party_backends():
    done = subprocess.run([*TINYCLIP, "backends", "--json"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=_env_with_plugin())
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert rows["mycpu"]["available"] and rows["mycpu"]["dtypes"] == ["float32"]
    assert not rows["broken"]["available"]


def test_nv_explains_a_gpu_its_runtime_does_not_drive(monkeypatch):
    """On an H200 tinygrad's NV device failed with a bare "StopIteration: " (its runtime knows no Hopper
    compute class): the reason must say what failed and what to use instead."""
    from tinyclip_backends import cuda
    monkeypatch.setattr(cuda._tinygrad, "probe_device", lambda device, context=None: "StopIteration: ")
    monkeypatch.setattr(cuda.os.path, "exists", lambda path: True)
    why = cuda.NV().probe()
    assert why.startswith("tinygrad's NV device opened the NVIDIA driver but does not drive this GPU")
    assert why.endswith("use the cuda backend")


@pytest.mark.parametrize("kind, accelerator", [("GPU", True), ("CPU", False), ("OTHER", False), (None, False)])
def test_only_an_opencl_gpu_outranks_the_native_cpu_backend(kind, accelerator):
    """PoCL (an OpenCL CPU device), and a device whose kind the driver would not tell, rank below cpu."""
    from tinyclip_backends.opencl import OpenCL
    cl = OpenCL()
    cl.__dict__["device_info"] = ("some device" if kind else None, kind)   # what the driver answered
    assert (cl.priority > by_name("cpu").priority) is accelerator
