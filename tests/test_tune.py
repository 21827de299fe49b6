"""`tinyclip tune`: a beam-searched graph stored in the graph cache, marked tuned, and run by later
processes without searching.

The search compiles and times dozens of candidates per kernel, so the test tunes one graph (image
tower, batch 1) of a checkpoint smaller than tiny-quick, with --beam 1 and tinygrad's
BEAM_MIN_PROGRESS raised so that each kernel gets one round of candidates.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tinyclip
from tinyclip import cli, graph_cache
from tinyclip.api import CLIP
from tests.conftest import ROOT
from tests.terminal import run_on_a_terminal

from tests.checkpoints import build_checkpoint, clip_config

TUNED_REL_TOL = 1e-5    # beam search may split or reorder a reduction's sums: max |tuned - plain| / max |plain|
SEARCH_ENV = {"BEAM_MIN_PROGRESS": "1000"}    # microseconds: stop each kernel's search after one round


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One layer per tower, width 16, 8x8 images, context length 16."""
    folder = tmp_path_factory.mktemp("micro")
    build_checkpoint(folder, clip_config(text=(16, 32, 1, 2), vision=(16, 32, 1, 2, 8, 4), proj=8,
                                         text_overrides=dict(max_position_embeddings=16)), seed=3, perturb=0.02)
    return folder


@pytest.fixture(scope="module")
def tuned(micro, tmp_path_factory):
    """(the cache root, tune's --json report) after tuning the image graph of batch 1."""
    root = tmp_path_factory.mktemp("tune-cache")
    env = {**os.environ, **SEARCH_ENV, "TINYCLIP_CACHE_DIR": str(root)}
    env.pop("TINYCLIP_PROGRESS", None)
    # stderr on a terminal, as a user runs it: the status line says which kernel the search is at
    code, out, shown = run_on_a_terminal([sys.executable, "-m", "tinyclip", "tune", str(micro), "--device", "cpu",
                                          "--beam", "1", "--batch", "1", "--only", "image", "--json"], cwd=ROOT, env=env)
    assert code == 0, shown
    return root, json.loads(out), shown


def test_tune_shows_which_kernel_the_search_is_at(tuned):
    kernels = re.findall(r"tuning the image encoder for batches of 1 with BEAM=1: kernel (\d+) of (\d+)", tuned[2])
    assert kernels and kernels[0][0] == "1" and kernels[-1][0] == kernels[-1][1], tuned[2]
    assert [int(i) for i, _ in kernels] == list(range(1, len(kernels) + 1)), "one line per kernel, in order"


def images():
    """A batch of one 8x8 RGB image, which goes up as a uint8 crop: the image graph tune tunes."""
    return np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)


def image_key(model, batch: int) -> tuple:
    return model.runner.image_key(batch, model.image_scaling())


def test_tune_stores_the_graph_marked_tuned(tuned, micro):
    root, report, _ = tuned
    [entry] = report
    assert (entry["tower"], entry["batch"], entry["beam"]) == ("image", 1, 1)
    assert entry["path"].startswith(str(root / "graphs"))
    header = graph_cache.read_graph_header(entry["path"])
    assert header["tuned"] is True and header["beam"] == 1
    assert header["key"]["graph"] == list(image_key(tinyclip.load(micro, device="cpu"), 1))
    assert header["key"]["graph"][2].startswith("uint8-") and header["key"]["backend"] == "cpu"
    assert entry["input"] == "uint8 crops"


# What a later process runs: embed a batch of one, report whether the graph came from the cache, tuned.
CHILD = """
import json, sys, warnings
import numpy as np
import tinyclip
from tinyclip.graph_cache import GraphCacheWarning
warnings.simplefilter("error", GraphCacheWarning)
folder, work = sys.argv[1:]
model = tinyclip.load(folder, device="cpu")
np.save(f"{work}/img.npy", model.encode_image(np.load(f"{work}/images.npy"), batch_size=1))
header = getattr(model.runner._jits[model.runner.image_key(1, model.image_scaling())], "graph_header", None)
print(json.dumps(header and header["tuned"]))
"""


def test_a_later_process_runs_the_tuned_graph_and_matches_the_plain_path(tuned, micro, tmp_path):
    root, [entry], _ = tuned
    before = open(entry["path"], "rb").read()
    np.save(tmp_path / "images.npy", images())
    done = subprocess.run([sys.executable, "-c", CHILD, str(micro), str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TINYCLIP_CACHE_DIR": str(root)}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) is True, "the tuned graph was not loaded"
    m = tinyclip.load(micro, device="cpu", graph_cache=False)
    want = CLIP(m.model, m.tokenizer, m.processor, m.backend, m.folder, jit=False).encode_image(images())
    got = np.load(tmp_path / "img.npy")
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= TUNED_REL_TOL, f"relative error {rel:.3g} > {TUNED_REL_TOL}"
    assert open(entry["path"], "rb").read() == before, "an ordinary run rewrote the tuned graph"


def test_an_untuned_capture_never_replaces_a_tuned_graph(tuned, micro, tmp_path, monkeypatch):
    root, [entry], _ = tuned
    shutil.copytree(root, tmp_path / "cache")
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path / "cache"))
    untuned = tinyclip.load(micro, device="cpu", graph_cache=False)
    untuned.encode_image(images(), batch_size=1)
    key = image_key(untuned, 1)
    jit = untuned.runner._jits[key]
    store = tinyclip.load(micro, device="cpu").runner.graphs
    path = store.path(key)
    before = path.read_bytes()
    assert store.save(key, jit) is None
    assert path.read_bytes() == before
    assert store.save(key, jit, tuned=True, beam=1) == path, "tune must replace what is there"


@pytest.mark.parametrize("args, env, message", [
    (["--beam", "0"], {}, "--beam must be at least 1"),
    (["--batch", "0,4"], {}, "--batch 0,4: expected comma-separated positive numbers"),
    (["--text-length", "11"], {}, "--text-length 11: texts of this model run at lengths 4, 6, 8, 10, 12, 14, 16"),
    ([], {"TINYCLIP_GRAPH_CACHE": "0"}, "the graph cache is switched off"),
])
def test_bad_arguments_fail_in_one_line_before_the_model_loads(micro, capsys, monkeypatch, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["tune", str(micro), "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyclip: error: ") and message in err[0], err
