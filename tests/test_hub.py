"""Hub ids resolve through huggingface_hub's real cache layout, offline."""
import fnmatch
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyclip
from tinyclip import hub
from tinyclip.errors import CheckpointNotFoundError
from tests.conftest import ROOT

REPO = "tinyclip-tests/clip-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(cache, folder, repo=REPO, commit=COMMIT, ref="main"):
    """Lay `folder`'s files out as huggingface_hub does: blobs by hash, snapshot symlinks, refs."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture(scope="module")
def cache(tiny_quick, tmp_path_factory):
    c = tmp_path_factory.mktemp("hub-cache")
    make_cache(c, tiny_quick.folder)
    return c


@pytest.mark.slow     # ~15 s: two loads, and the text graph compiled for each
def test_repo_id_loads_from_cache_offline(cache, tiny_quick):
    model = tinyclip.load(REPO, device="cpu", cache_dir=cache, local_files_only=True)
    direct = tinyclip.load(tiny_quick.folder, device="cpu")
    assert model.folder.name == COMMIT
    np.testing.assert_array_equal(model.encode_text(["a cat"]), direct.encode_text(["a cat"]))


def test_revision_is_honoured(cache, tiny_quick):
    make_cache(cache, tiny_quick.folder, commit="f" * 40, ref="v2")
    assert tinyclip.load(REPO, device="cpu", cache_dir=cache, local_files_only=True, revision="v2").folder.name == "f" * 40
    with pytest.raises(CheckpointNotFoundError, match=r"clip-tiny@v3: not in the Hugging Face cache"):
        tinyclip.load(REPO, device="cpu", cache_dir=cache, local_files_only=True, revision="v3")


def test_hf_hub_offline_environment_variable(cache):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE are read by huggingface_hub at import: use a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    code = ("import tinyclip; m = tinyclip.load(%r, device='cpu'); print(m.folder.name); "
            "tinyclip.load('tinyclip-tests/not-cached', device='cpu')" % REPO)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.stdout.strip() == COMMIT
    assert "tinyclip-tests/not-cached: not in the Hugging Face cache" in r.stderr
    assert "offline mode is on" in r.stderr


def test_not_cached_offline_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"openai/clip-vit-base-patch32: not in the Hugging Face cache "
                       r"\(.*\) and offline mode is on .*Download it once while online"):
        tinyclip.load("openai/clip-vit-base-patch32", device="cpu", cache_dir=tmp_path, local_files_only=True)


@pytest.mark.parametrize("name", ["no/such/deep/path", "./missing-folder", "bad name!"])
def test_neither_folder_nor_repo_id(name):
    with pytest.raises(CheckpointNotFoundError, match=r"no such folder, and not a Hugging Face repo id"):
        hub.locate(name)


def test_a_file_is_not_a_checkpoint(tiny_quick):
    with pytest.raises(CheckpointNotFoundError, match=r"is a file; pass the checkpoint folder"):
        hub.locate(tiny_quick.folder / "config.json")


def test_download_patterns_take_only_safe_files():
    def allowed(name):
        return any(fnmatch.fnmatch(name, p) for p in hub.ALLOW_PATTERNS)
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                 "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "preprocessor_config.json"):
        assert allowed(name), name
    for name in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack", "model.ckpt.index", "open_clip_model.pt",
                 "pytorch_model.bin.index.json", "README.md"):
        assert not allowed(name), name
