"""A capture's kernels compile in forked workers (tinyclip/_tinygrad/compile_pool.py), with the same numbers."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from tinygrad import Tensor

import tinyclip
from tinyclip._tinygrad import compile_pool
from tests.conftest import ROOT

DEVICE = "cpu"
FAST_REL_TOL = 1e-5      # the graphs against the plain path: float32 rounding, of the largest value

# A fresh process (no Ray, no gRPC: forking is safe there) captures both towers and says which pool compiled.
CHILD = """
import json, multiprocessing, sys
import numpy as np
import tinyclip
from tinyclip._tinygrad import compile_pool
from tinygrad.engine import worker
folder, work = sys.argv[1:]
model = tinyclip.load(folder, device="cpu", graph_cache=False)
np.savez(f"{work}/child.npz", text=model.encode_text(np.load(f"{work}/ids.npy")),
         image=model.encode_image(np.load(f"{work}/pixels.npy")))
print(json.dumps({"fork_is_safe": compile_pool.fork_is_safe(), "forked pools": compile_pool.pools_made,
                  "spawned pool": worker.worker_pool is not None, "children left": len(multiprocessing.active_children())}))
"""


def test_a_capture_compiles_in_forked_workers_and_gets_the_plain_numbers(tiny_quick, tmp_path):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False)
    ids = model.tokenize(["a photo of a cat", "a dog", "an astronaut riding a horse"])
    v = model.config.vision_config
    pixels = np.random.default_rng(0).standard_normal((3, 3, v.image_size, v.image_size)).astype(np.float32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "pixels.npy", pixels)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_quick.folder), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # at most one pool per capture, ended with it: its workers would keep the process's memory as it was at
    # the fork. A capture whose kernels are all C source (the cpu backend's, where they fit) makes none.
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.pop("forked pools") in (1, 2)
    assert report == {"fork_is_safe": True, "spawned pool": False, "children left": 0}
    child = np.load(tmp_path / "child.npz")
    with model.backend.context():
        plain = {"text": model.model.get_text_features(Tensor(ids.astype(np.int32), device="CPU")).numpy(),
                 "image": model.model.get_image_features(Tensor(pixels, device="CPU")).numpy()}
    for name, want in plain.items():
        assert np.abs(child[name] - want).max() <= FAST_REL_TOL * np.abs(want).max(), name


@pytest.mark.parametrize("library", compile_pool.UNFORKABLE)
def test_no_fork_beside_a_library_whose_threads_may_hold_locks(monkeypatch, library):
    """With gRPC or Ray loaded (a Ray worker), captures keep tinygrad's spawned pool."""
    from tinygrad.engine import realize
    monkeypatch.setitem(sys.modules, library, types.ModuleType(library))
    assert not compile_pool.fork_is_safe()
    tinygrad_pool = realize.get_worker_pool
    with compile_pool.forked_compiles():
        assert realize.get_worker_pool is tinygrad_pool


def test_tinygrad_gets_its_own_pool_back_after_a_capture_even_one_that_fails(monkeypatch):
    from tinygrad.engine import realize
    for library in compile_pool.UNFORKABLE:
        monkeypatch.delitem(sys.modules, library, raising=False)
    tinygrad_pool = realize.get_worker_pool
    with pytest.raises(RuntimeError, match="capture failed"):
        with compile_pool.forked_compiles():
            assert realize.get_worker_pool is not tinygrad_pool
            raise RuntimeError("capture failed")
    assert realize.get_worker_pool is tinygrad_pool
