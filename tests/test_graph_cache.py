"""The graph cache (tinyclip/graph_cache/): captured encoder graphs saved without their weights
and run by later processes instead of capturing again. tiny-quick checkpoint, CPU; every test
points the cache at its own folder through TINYCLIP_CACHE_DIR.
"""
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from tinygrad.helpers import Context
from tinygrad.nn.state import get_state_dict

import tinyclip
from tinyclip import graph_cache, registry
from tinyclip.api import CLIP
from tinyclip.graph_cache import GraphCacheWarning
from tinyclip.preprocess import PixelScaling
from tests.conftest import ROOT, TINY, checkpoint

from tests.checkpoints import build_checkpoint, clip_config

DEVICE = "cpu"
BATCH = 4                  # batches of 1 and 3 run in the buckets 1 and 4
# The graphs embed() compiles: the one text is a query, compiled at the full context (batch_plan); a
# later process, which finds the text graph of 4 rows x 8 positions saved too, runs it there (less work).
SAVED = ["image-1", "image-4", "text-1-77", "text-4-8"]
LOADED = ["image-1", "image-4", "text-4-8"]
PLAIN_REL_TOL = 1e-6       # graph vs the plain, un-jitted path: max |a - b| / max |b|
WEIGHT_PROBE = 64          # bytes of each weight looked for in a graph file
OTHER_MODEL_MIN_DIFF = 1e-3   # two random checkpoints' embeddings differ by more than this somewhere
TEXTS = ["a photo of a cat", "a dog", "an astronaut riding a horse"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder for this test; returns where the graph files go."""
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYCLIP_GRAPH_CACHE", raising=False)
    return tmp_path / "cache" / "graphs"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """tiny-quick's architecture with other weights."""
    folder = tmp_path_factory.mktemp("tiny-quick-twin")
    build_checkpoint(folder, clip_config(**TINY["tiny-quick"]), seed=7, perturb=0.02)
    return folder


@pytest.fixture(scope="module")
def inputs(tiny_quick):
    v = tiny_quick.config.vision_config
    pixels = np.random.default_rng(0).standard_normal((3, 3, v.image_size, v.image_size)).astype(np.float32)
    return pixels, tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False).tokenize(TEXTS)


def load(folder, **kw):
    return tinyclip.load(folder, device=DEVICE, **kw)


def plain(model):
    """The same loaded model run without a JIT: every call schedules and runs its kernels."""
    return CLIP(model.model, model.tokenizer, model.processor, model.backend, model.folder, jit=False)


def embed(model, pixels, ids) -> dict:
    """Embeddings from the image and text graphs of buckets 1 and 4."""
    return {f"{what}{n}": encode(x[:n], batch_size=BATCH) for n in (1, 3)
            for what, encode, x in (("img", model.encode_image, pixels), ("txt", model.encode_text, ids))}


def from_disk(model) -> list[str]:
    """The runner's graphs that were loaded from the cache rather than captured."""
    return sorted("-".join(map(str, k)) for k, jit in model.runner._jits.items() if hasattr(jit, "graph_header"))


def assert_close(ours, theirs, what):
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= PLAIN_REL_TOL, f"{what}: relative error {rel:.3g} > {PLAIN_REL_TOL}"


def graph_files(cache):
    return sorted(cache.glob("*.graph")) if cache.is_dir() else []


# ---- a fresh process runs the saved graphs ------------------------------------------------------------

# What the fresh process runs: embed() and from_disk() as above, with any cache warning an error.
CHILD = """
import json, sys, warnings
import numpy as np
import tinyclip
from tinyclip.graph_cache import GraphCacheWarning
warnings.simplefilter("error", GraphCacheWarning)
folder, work, batch = sys.argv[1:]
model = tinyclip.load(folder, device="cpu")
pixels, ids = np.load(f"{work}/pixels.npy"), np.load(f"{work}/ids.npy")
np.savez(f"{work}/child.npz", **{f"{what}{n}": encode(x[:n], batch_size=int(batch)) for n in (1, 3)
         for what, encode, x in (("img", model.encode_image, pixels), ("txt", model.encode_text, ids))})
jits = model.runner._jits
print(json.dumps(sorted("-".join(map(str, k)) for k, jit in jits.items() if hasattr(jit, "graph_header"))))
"""


def test_a_fresh_process_runs_the_saved_graphs_and_gets_the_same_embeddings(tiny_quick, inputs, cache, tmp_path):
    pixels, ids = inputs
    capturing = embed(load(tiny_quick.folder), pixels, ids)
    reference = embed(plain(load(tiny_quick.folder, graph_cache=False)), pixels, ids)
    assert len(graph_files(cache)) == 4, graph_files(cache)
    np.save(tmp_path / "pixels.npy", pixels)
    np.save(tmp_path / "ids.npy", ids)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_quick.folder), str(tmp_path), str(BATCH)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name.rsplit("-", 1)[0] for p in graph_files(cache)) == SAVED
    assert json.loads(done.stdout.strip().splitlines()[-1]) == LOADED
    child = np.load(tmp_path / "child.npz")
    for name, want in reference.items():
        np.testing.assert_array_equal(child[name], capturing[name], err_msg=name)
        assert_close(child[name], want, name)


def test_files_are_private_and_say_what_they_hold(tiny_quick, inputs, cache):
    model = load(tiny_quick.folder)
    model.encode_image(inputs[0][:1], batch_size=BATCH)
    [path] = graph_files(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    header = graph_cache.read_graph_header(path)
    assert header["key"]["graph"] == ["image", 1] and header["tuned"] is False
    assert header["key"]["dtype"] == "float32" and header["key"]["backend"] == DEVICE
    assert not [p for p in cache.iterdir() if p.suffix != ".graph"], "a temporary file was left behind"


def test_graphs_unused_for_a_month_are_deleted_when_another_is_saved(tiny_quick, inputs, cache):
    pixels, ids = inputs
    model = load(tiny_quick.folder)
    model.encode_image(pixels[:1], batch_size=BATCH)
    model.encode_image(pixels[:3], batch_size=BATCH)
    used, unused = model.runner.graphs.path(("image", 1)), model.runner.graphs.path(("image", 4))
    leftover = cache / ".image-9-0.graph.x.tmp"     # what a process killed while writing leaves
    leftover.write_bytes(b"")
    month = (graph_cache.UNUSED_DAYS + 1) * 86400
    for path in (used, unused, leftover):
        old = path.stat().st_mtime - month
        os.utime(path, (old, old))
    load(tiny_quick.folder).encode_image(pixels[:1], batch_size=BATCH)     # loading marks it used
    model.encode_text(ids[:1], batch_size=BATCH)                           # saving prunes
    assert used.exists() and not unused.exists() and not leftover.exists()
    assert model.runner.graphs.path(("text", 1, 77)).exists()


# ---- weights are referenced, not stored -----------------------------------------------------------------

def test_a_graph_file_holds_no_weight_bytes(tiny_quick, inputs, cache):
    model = load(tiny_quick.folder)
    embed(model, *inputs)
    weights = {name: t.numpy().tobytes() for name, t in get_state_dict(model.model).items()}
    for path in graph_files(cache):
        data = path.read_bytes()
        for name, raw in weights.items():
            if len(raw) >= WEIGHT_PROBE:
                middle = len(raw) // 2
                assert raw[:WEIGHT_PROBE] not in data and raw[middle:middle + WEIGHT_PROBE] not in data, \
                    f"{path.name} holds bytes of {name}"
    text_weights = sum(len(raw) for name, raw in weights.items() if name.startswith("text_"))
    for path in cache.glob("text-*.graph"):
        assert path.stat().st_size < text_weights / 10, (path.stat().st_size, text_weights)


def test_a_saved_graph_runs_with_the_weights_of_the_model_loaded_now(tiny_quick, twin, inputs, cache):
    pixels, ids = inputs
    first = embed(load(tiny_quick.folder), pixels, ids)
    other = load(twin)
    got = embed(other, pixels, ids)
    assert from_disk(other) == LOADED, "the twin should reuse the graphs"
    want = embed(plain(other), pixels, ids)
    for name in want:
        assert_close(got[name], want[name], name)
        assert np.abs(got[name] - first[name]).max() > OTHER_MODEL_MIN_DIFF, f"{name}: the first model's answer"


# ---- files that must not be used ---------------------------------------------------------------------------

def _capture_one(folder, pixels):
    """Capture image bucket 1; returns (the graph file, its embedding)."""
    model = load(folder)
    out = model.encode_image(pixels[:1], batch_size=BATCH)
    return model.runner.graphs.path(("image", 1)), out


@pytest.mark.parametrize("make_unsafe", ["file g+w", "folder g+w", "file owned by another user"])
def test_a_file_others_could_write_is_refused_with_a_warning_and_left_alone(tiny_quick, inputs, cache, make_unsafe):
    path, want = _capture_one(tiny_quick.folder, inputs[0])
    if make_unsafe == "file g+w":
        path.chmod(0o620)
    elif make_unsafe == "folder g+w":
        cache.chmod(0o720)
    elif os.getuid() != 0:
        pytest.skip("changing a file's owner needs root")
    else:
        os.chown(path, 65534, -1)
    before = path.read_bytes()
    model = load(tiny_quick.folder)
    with pytest.warns(GraphCacheWarning) as record:
        got = model.encode_image(inputs[0][:1], batch_size=BATCH)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("tinyclip: not using the cached graph") and ("not by you" in m or "writable by group" in m)
               for m in messages), messages
    assert any(m.startswith("tinyclip: not saving") for m in messages), messages
    assert from_disk(model) == []
    np.testing.assert_array_equal(got, want)
    assert path.read_bytes() == before, "someone else's file was overwritten"


def _truncated(data, path, model):
    return data[:len(data) // 2]


def _garbage(data, path, model):
    return np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes()


def _empty(data, path, model):
    return b""


def _bad_pickle(data, path, model):
    """A well-formed header whose checksum matches a payload that is not a pickle."""
    return _with_header(graph_cache.read_graph_header(path)["key"], b"\x80\x05not a pickle at all")


def _graph_of_another_bucket(data, path, model):
    """Bucket 4's graph under bucket 1's key: it loads, and the JIT refuses the bucket-1 input."""
    v = model.config.vision_config
    model.encode_image(np.zeros((4, v.num_channels, v.image_size, v.image_size), np.float32), batch_size=BATCH)
    other = model.runner.graphs.path(("image", 4)).read_bytes()
    return _with_header(graph_cache.read_graph_header(path)["key"], other[other.index(b"\n", len(graph_cache.MAGIC)) + 1:])


def _with_header(key, payload):
    import hashlib
    header = {"key": key, "tuned": False, "beam": 0, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return graph_cache.MAGIC + json.dumps(header).encode() + b"\n" + payload


@pytest.mark.parametrize("damage", [_truncated, _garbage, _empty, _bad_pickle, _graph_of_another_bucket],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_damaged_file_gives_a_warning_the_right_answer_and_is_replaced(tiny_quick, inputs, cache, damage):
    path, want = _capture_one(tiny_quick.folder, inputs[0])
    path.write_bytes(damage(path.read_bytes(), path, load(tiny_quick.folder)))
    model = load(tiny_quick.folder)
    with pytest.warns(GraphCacheWarning, match="cannot be used"):
        got = model.encode_image(inputs[0][:1], batch_size=BATCH)
    np.testing.assert_array_equal(got, want)
    assert graph_cache.read_graph_header(path)["key"]["graph"] == ["image", 1], "not replaced by a fresh capture"
    again = load(tiny_quick.folder)
    np.testing.assert_array_equal(again.encode_image(inputs[0][:1], batch_size=BATCH), want)
    assert from_disk(again) == ["image-1"]


# ---- keys ----------------------------------------------------------------------------------------------------

def test_what_shapes_the_graph_changes_the_file_and_the_weights_do_not(tiny_quick, twin, tmp_path_factory, cache):
    base = load(tiny_quick.folder).runner.graphs
    image1 = base.path(("image", 1))
    assert load(tiny_quick.folder).runner.graphs.path(("image", 1)) == image1, "not stable between loads"
    assert load(twin).runner.graphs.path(("image", 1)) == image1, "the weights' values must not matter"
    others = {
        "batch bucket": base.path(("image", 4)),
        "tower": base.path(("text", 1, 8)),
        "text length": base.path(("text", 1, 16)),
        "dtype": load(tiny_quick.folder, dtype="float16").runner.graphs.path(("image", 1)),
        "config": load(checkpoint("tiny-gelu", tmp_path_factory).folder).runner.graphs.path(("image", 1)),
    }
    with Context(NUM_CPU_THREADS=3):   # kernels split between another number of threads
        others["threads"] = load(tiny_quick.folder).runner.graphs.path(("image", 1))
    if registry.select("cpu-llvm").available:
        others["device"] = tinyclip.load(tiny_quick.folder, device="cpu-llvm").runner.graphs.path(("image", 1))
    # images as uint8 crops, normalised in the graph with the processor's constants (tinyclip/pixels.py)
    runner = load(tiny_quick.folder).runner
    others["uint8 crops"] = base.path(runner.image_key(1, PixelScaling(1 / 255, (0.5,) * 3, (0.25,) * 3)))
    others["their normalisation"] = base.path(runner.image_key(1, PixelScaling(1 / 255, (0.5,) * 3, (0.3,) * 3)))
    for what, path in others.items():
        assert path != image1, f"a different {what} uses the same file"
    assert len(set(others.values())) == len(others)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYCLIP_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert graph_cache.cache_dir() == tmp_path / "home" / ".cache" / "tinyclip" / "graphs"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert graph_cache.cache_dir() == tmp_path / "xdg" / "tinyclip" / "graphs"
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "mine"))
    assert graph_cache.cache_dir() == tmp_path / "mine" / "graphs"


# ---- switching it off ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["TINYCLIP_GRAPH_CACHE=0", "graph_cache=False"])
def test_the_cache_can_be_switched_off(tiny_quick, inputs, cache, monkeypatch, how):
    if how.startswith("TINYCLIP"):
        monkeypatch.setenv("TINYCLIP_GRAPH_CACHE", "0")
        model = load(tiny_quick.folder)
    else:
        model = load(tiny_quick.folder, graph_cache=False)
    assert model.runner.graphs is None
    model.encode_image(inputs[0][:1], batch_size=BATCH)
    model.encode_image(inputs[0][:1], batch_size=BATCH)
    assert not cache.exists()


def test_a_weight_that_is_a_view_of_another_buffer_is_never_saved_in_a_graph(tiny_quick, inputs, cache):
    """A graph file names each weight by its state-dict name and binds it to the loading model's. A parameter
    that is a view into another buffer (as a q/k/v bias sliced from a fused in_proj in tinygrad would be)
    cannot be named: its graph is not saved, rather than bind another checkpoint's values later."""
    from tinygrad import Tensor
    model = load(tiny_quick.folder)
    attn = model.model.text_model.encoder.layers[0].self_attn
    fused = Tensor(np.concatenate([attn.q_proj.bias.numpy(), attn.k_proj.bias.numpy()]), device="CPU").realize()
    attn.q_proj.bias = fused[:attn.q_proj.bias.shape[0]].contiguous().realize()    # a view of `fused`
    _, ids = inputs
    with pytest.warns(GraphCacheWarning, match=r"is a view of another buffer"):
        model.encode_text(ids[:1], batch_size=BATCH)
    assert not [p for p in graph_files(cache) if p.name.startswith("text-")]
