"""A checkpoint's identity survives copying it and tells other weights apart."""
import shutil

import numpy as np
import pytest

import tinyclip
from tinyclip import identity
from tinyclip.errors import CheckpointError
from tinyclip.weights import checkpoint_files

DEVICE = "cpu"


def _fingerprint(folder):
    return identity.fingerprint(folder, checkpoint_files(folder))


def test_a_copied_checkpoint_has_the_same_identity(tiny_quick, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_quick.folder, copy)
    a = tinyclip.load(tiny_quick.folder, device=DEVICE).identity
    b = tinyclip.load(copy, device=DEVICE).identity
    assert a["folder"] != b["folder"] and a["hub_id"] is None
    assert identity.same_model(a, b)


def test_other_weights_of_the_same_architecture_have_another_identity(tiny_quick, tmp_path):
    from safetensors.numpy import load_file, save_file
    copy = tmp_path / "finetuned"
    shutil.copytree(tiny_quick.folder, copy)
    weights = load_file(copy / "model.safetensors")
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    weights[key] = weights[key] + np.float32(1e-3)
    save_file(weights, copy / "model.safetensors")
    assert _fingerprint(copy) != _fingerprint(tiny_quick.folder)


def test_reformatted_config_keeps_the_identity(tiny_quick, tmp_path):
    import json
    copy = tmp_path / "reformatted"
    shutil.copytree(tiny_quick.folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(config, indent=7, sort_keys=False))
    assert _fingerprint(copy) == _fingerprint(tiny_quick.folder)


def test_an_unreadable_config_names_the_file(tiny_quick, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(tiny_quick.folder, copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read it to identify the checkpoint"):
        _fingerprint(copy)
