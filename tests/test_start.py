"""A new process's first answer: the padding account kept across processes, only the chosen backend opened,
backend probes remembered, the CPU device's own programs kept, and the start-up trace. Each "process" here is
a real subprocess on the tiny-quick checkpoint; what is checked is counts and names, never times.
"""
import glob
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT

IMAGE = str(ROOT / "tests" / "data" / "images" / "chelsea.png")
BATCH = 32


def python(code: str, env: dict, *args) -> dict:
    """Run `code` in a fresh interpreter (from the repository root) and return the JSON it prints last."""
    run = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture
def env(tmp_path):
    e = {**os.environ, "TINYCLIP_CACHE_DIR": str(tmp_path / "cache"), "TINYCLIP_PROGRESS": "0"}
    e.pop("TINYCLIP_GRAPH_CACHE", None)
    e.pop("TINYCLIP_TRACE", None)
    return e


ONE_CALL = r"""
import json, sys, tinyclip
m = tinyclip.load(sys.argv[1], device="cpu")
n = int(sys.argv[2])
m.encode_image([sys.argv[3]] * n, batch_size=32)
keys = sorted(m.runner._jits)
print(json.dumps({"graphs": [list(k[:2]) for k in keys], "image_cost": m.runner.planner.image_cost}))
"""


def test_one_image_calls_after_a_batch_job_stop_padding_once_their_padding_has_cost_a_compile(tiny_quick, env):
    """The padding account lives next to the graph cache: each new process adds its padding (31 rows of a
    32-row graph for one image) to the one-image graph's rent, and the process whose padding would take the
    rent past a compile's cost (the kernel set's, KernelSet.compile_costs) compiles the one-image graph, which
    every later process loads instead of padding."""
    assert python(ONE_CALL, env, str(tiny_quick.folder), str(BATCH), IMAGE)["graphs"] == [["image", 32]]
    first_call = python(ONE_CALL, env, str(tiny_quick.folder), "1", IMAGE)
    first, cost = first_call["graphs"], first_call["image_cost"]
    assert first == [["image", 32]], "a one-image call pads into the compiled 32-image graph"
    (account,) = glob.glob(os.path.join(env["TINYCLIP_CACHE_DIR"], "graphs", "account-*.json"))
    data = json.loads(pathlib.Path(account).read_text())
    (one, rent), = data["rent"].items()
    assert one.startswith("image-1-") and rent == BATCH - 1, data
    # Many processes later (seeded, instead of running them): one more call's padding reaches the cost, a
    # second's would pass it.
    data["rent"][one] = cost - (BATCH - 1)
    pathlib.Path(account).write_text(json.dumps(data))
    ran = [python(ONE_CALL, env, str(tiny_quick.folder), "1", IMAGE)["graphs"] for _ in range(3)]
    assert ran == [[["image", 32]], [["image", 1]], [["image", 1]]], ran
    assert json.loads(pathlib.Path(account).read_text())["rent"] == {}, "the compile paid the rent"


def test_padding_account_is_per_process_without_a_graph_cache(tiny_quick, env):
    """TINYCLIP_GRAPH_CACHE=0 keeps nothing on disk: every process starts with no rent (and no account file)."""
    env = {**env, "TINYCLIP_GRAPH_CACHE": "0"}
    python(ONE_CALL, env, str(tiny_quick.folder), "1", IMAGE)
    assert not glob.glob(os.path.join(env["TINYCLIP_CACHE_DIR"], "**", "account-*.json"), recursive=True)


OPENED = r"""
import json, sys, tinyclip
from tinygrad import Device
from tinyclip._tinygrad import device
m = tinyclip.load(sys.argv[1], device=sys.argv[2])
m.encode_text(["a cat"])
print(json.dumps({"opened": sorted(Device._opened_devices), "families": device.attempted_families()}))
"""


@pytest.mark.parametrize("name, opened", [("cpu", "CPU"), ("cpu-llvm", "CPU")])
def test_choosing_a_device_opens_no_other_backends_device(tiny_quick, env, name, opened):
    got = python(OPENED, env, str(tiny_quick.folder), name)
    # PYTHON is tinygrad's own host device (for values it computes in Python), not a backend's
    assert [d for d in got["opened"] if d != "PYTHON"] == [opened], got
    assert set(got["families"]) == {opened}, "no other device family was asked to open"


CHOOSE = r"""
import json
from tinyclip import registry
from tinyclip._tinygrad import device
b = registry.select(None)
print(json.dumps({"chosen": b.name, "families": sorted(device.attempted_families())}))
"""


def test_the_default_backend_skips_backends_remembered_as_unavailable(env):
    """The first process asks every backend above the chosen one; the next asks only those it cannot
    remember (OpenCL's device kind and the NVIDIA backends' absence are remembered under their drivers'
    files and environment), and opens the chosen device. Changing what decides an answer asks again."""
    first = python(CHOOSE, env)
    second = python(CHOOSE, env)
    assert second["chosen"] == first["chosen"]
    assert len(second["families"]) < len(first["families"]) or first["families"] == [second["families"][-1]]
    assert first["chosen"] not in ("cpu", "cpu-llvm") or second["families"] == ["CPU"], second
    changed = python(CHOOSE, {**env, "CUDA_VISIBLE_DEVICES": "7"})
    assert "NV" in changed["families"] or "CUDA" in changed["families"], changed


def test_remembered_probe_answers_are_read_only_from_a_file_you_own_alone(env, tmp_path):
    first = python(CHOOSE, env)
    path = pathlib.Path(env["TINYCLIP_CACHE_DIR"]) / "backends.json"
    assert path.is_file()
    os.chmod(path, 0o666)     # group and others may write it now: not trusted, so every backend is asked
    again = python(CHOOSE, env)
    assert again["families"] == first["families"], again


PROGRAMS = r"""
import json
from tinyclip import registry
from tinyclip._tinygrad import device
registry.select("cpu")
print(json.dumps({"generated": device.generated_device_programs()}))
"""


def test_cpu_device_programs_are_generated_once_per_machine(env):
    assert python(PROGRAMS, env)["generated"] == 4, "a new cache: tinygrad's four queue programs generated"
    assert python(PROGRAMS, env)["generated"] == 0, "a later process takes them from the cache"
    folder = pathlib.Path(env["TINYCLIP_CACHE_DIR"]) / "cpu" / "programs"
    os.chmod(folder, 0o777)
    assert python(PROGRAMS, env)["generated"] == 4, "an other-writable folder is not read"


def test_trace_prints_one_line_per_phase(tiny_quick, env):
    run = subprocess.run([sys.executable, "-m", "tinyclip", "--trace", "classify", IMAGE, "--labels", "cat", "dog",
                          "--templates", "none", "--model", str(tiny_quick.folder), "--device", "cpu"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("tinyclip: trace: ")]
    phases = [line[len("tinyclip: trace: "):].split(" ")[0] for line in lines]
    for phase in ("imports", "backend", "weights", "graph", "total"):
        assert phase in phases, lines
    assert all(" s " in line or line.endswith(" s") or " s (" in line for line in lines), lines
    quiet = subprocess.run([sys.executable, "-m", "tinyclip", "classify", IMAGE, "--labels", "cat", "dog",
                            "--templates", "none", "--model", str(tiny_quick.folder), "--device", "cpu"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert "trace" not in quiet.stderr


def test_each_tower_is_read_on_its_first_use_and_the_results_do_not_change(tiny_quick):
    """load() reads neither tower; an image call reads the image tower only, a text call the text tower;
    CLIP.model reads everything. The embeddings equal those of a model read whole, and the graph keys are
    the same whichever tower ran first (they are taken before any tower's weights are arranged)."""
    import tinyclip
    from tinyclip.model import tower_of
    from tinygrad.nn.state import get_state_dict
    whole = tinyclip.load(tiny_quick.folder, device="cpu")
    want_image, want_text = whole.model and whole.encode_image([IMAGE]), whole.encode_text(["a cat", "a dog"])

    def realized(clip, tower):
        params = {k: t for k, t in get_state_dict(clip.runner.model).items() if tower_of(k) == tower}
        return {t.uop.base.is_realized for t in params.values()}

    image_first = tinyclip.load(tiny_quick.folder, device="cpu")
    assert image_first.towers.pending == {"text", "image"} and realized(image_first, "image") == {False}
    np.testing.assert_array_equal(image_first.encode_image([IMAGE]), want_image)
    assert image_first.towers.pending == {"text"} and realized(image_first, "image") == {True}
    assert realized(image_first, "text") == {False}
    np.testing.assert_array_equal(image_first.encode_text(["a cat", "a dog"]), want_text)
    assert image_first.towers.pending == set() and realized(image_first, "text") == {True}

    text_first = tinyclip.load(tiny_quick.folder, device="cpu")
    np.testing.assert_array_equal(text_first.encode_text(["a cat", "a dog"]), want_text)
    assert text_first.towers.pending == {"image"}
    assert text_first.runner.graphs.key(("image", 1)) == image_first.runner.graphs.key(("image", 1))
    assert text_first.runner.graphs.key(("text", 2, 7)) == image_first.runner.graphs.key(("text", 2, 7))
    text_first.model     # a user holding the model holds every weight
    assert text_first.towers.pending == set() and realized(text_first, "image") == {True}


EXIT = r"""
import atexit, gc, json, sys
atexit.register(lambda: print(json.dumps({"frozen": gc.get_freeze_count()})))   # runs last: first in, last out
if sys.argv[1] == "cli":
    from tinyclip.cli import main
    main(["classify", sys.argv[3], "--labels", "cat", "dog", "--templates", "none", "--model", sys.argv[2],
          "--device", "cpu"])
else:
    import tinyclip
    tinyclip.load(sys.argv[2], device="cpu").encode_image([sys.argv[3]])
"""


def test_a_command_exits_without_collecting_the_models_objects_and_a_library_call_does_not(tiny_quick, env):
    """The tinyclip command leaves the objects alive at its exit out of the last garbage collection (what that
    saves is timed by benchmarks/first_use.py, not here); load() in a user's program changes nothing there."""
    assert python(EXIT, env, "cli", str(tiny_quick.folder), IMAGE)["frozen"] > 10_000
    assert python(EXIT, env, "library", str(tiny_quick.folder), IMAGE)["frozen"] == 0
