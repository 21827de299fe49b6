"""Checkpoints for the tests, built offline with transformers (random init, real CLIPConfigs).

Each is saved with save_pretrained(safe_serialization=True), the real CLIP
vocabulary and a matching preprocessor_config.json, once per test session.
The torch model stays available as the oracle.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config

ROOT = pathlib.Path(__file__).resolve().parents[1]

# PoCL (the opencl backend on a CPU) keeps built kernels in ~/.cache/pocl/kcache by default, shared by
# every process on the machine. Test runs that overlap there (two suites, or a suite and validate.py)
# build the same kernels into the same entries at once, and PoCL 3.1 aborts the process when a kernel
# binary it just saw in its cache cannot be opened or linked (POCL_ABORT in lib/CL/devices/common.c;
# pocl/pocl issues 430, 586, 1480), with its message on stderr, which pytest captures and loses when
# the process dies. Each test run gets a kernel cache of its own, set here before anything loads PoCL
# (it reads POCL_CACHE_DIR once, when the OpenCL platform is first opened) and inherited by subprocesses.
if "POCL_CACHE_DIR" not in os.environ:
    POCL_CACHE_DIR = tempfile.mkdtemp(prefix="tinyclip-tests-pocl-")
    os.environ["POCL_CACHE_DIR"] = POCL_CACHE_DIR
    atexit.register(shutil.rmtree, POCL_CACHE_DIR, True)

# Small configurations that between them use both activations (and the tanh GELU), odd widths,
# other eps, other projection dims, other context lengths and image/patch sizes.
TINY = {
    "tiny-quick": dict(text=(48, 80, 2, 4), vision=(40, 72, 2, 5, 30, 6), proj=24),
    "tiny-gelu": dict(text=(64, 96, 3, 2), vision=(36, 60, 2, 3, 28, 14), proj=40,
                      text_overrides=dict(hidden_act="gelu", layer_norm_eps=1e-6, max_position_embeddings=32),
                      vision_overrides=dict(hidden_act="gelu", layer_norm_eps=1e-6)),
    "tiny-odd": dict(text=(30, 50, 1, 3), vision=(42, 44, 1, 7, 33, 11), proj=17, logit_scale_init_value=3.5,
                     text_overrides=dict(hidden_act="gelu_new", layer_norm_eps=1e-3, max_position_embeddings=16),
                     vision_overrides=dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-3)),
}


class Checkpoint:
    def __init__(self, folder, torch_model):
        self.folder, self.torch_model = folder, torch_model
        self.config = torch_model.config


_built = {}


def checkpoint(name, tmp_path_factory) -> Checkpoint:
    if name not in _built:
        folder = tmp_path_factory.mktemp(name.replace("/", "_"))
        spec = TINY.get(name) or ARCHITECTURES[name]
        model = build_checkpoint(folder, clip_config(**spec), seed=len(_built), perturb=0.02 if name in TINY else 0.0)
        _built[name] = Checkpoint(folder, model)
    return _built[name]


def pytest_collection_modifyitems(items):
    """Every test that builds the ViT-B/32 checkpoint (600 MB, a minute to build and compile) is slow."""
    for item in items:
        if "vit_b32" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny(request, tmp_path_factory) -> Checkpoint:
    return checkpoint(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_quick(tmp_path_factory) -> Checkpoint:
    return checkpoint("tiny-quick", tmp_path_factory)


@pytest.fixture(scope="session")
def vit_b32(tmp_path_factory) -> Checkpoint:
    return checkpoint("openai/clip-vit-base-patch32", tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _graph_cache_in_a_temp_folder(tmp_path_factory):
    """Compiled graphs the tests save go to a temp folder, not the user's ~/.cache/tinyclip.
    Set in os.environ, so subprocesses the tests start inherit it."""
    import os
    folder = tmp_path_factory.mktemp("tinyclip-cache")
    old = os.environ.get("TINYCLIP_CACHE_DIR")
    os.environ["TINYCLIP_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("TINYCLIP_CACHE_DIR", None)
    else:
        os.environ["TINYCLIP_CACHE_DIR"] = old
