"""Loading checkpoints: config.json, safetensors headers, keys and shapes, shards, unsafe formats."""
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tinyclip
from tinyclip.config import CLIPConfig
from tinyclip.errors import CheckpointError, ConfigError

DEVICE = "cpu"


@pytest.fixture
def folder(tiny_quick, tmp_path):
    """A fresh, writable copy of the tiny checkpoint."""
    dst = tmp_path / "ck"
    shutil.copytree(tiny_quick.folder, dst)
    return dst


def write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def one_tensor_file(path, **entry):
    base = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    base.update(entry)
    write_raw(path, {"logit_scale": base}, b"\0" * 8)


# ---- config.json ---------------------------------------------------------------------------------

def test_config_reads_every_field(tiny):
    cfg = CLIPConfig.from_file(tiny.folder / "config.json")
    ref = tiny.config
    assert cfg.projection_dim == ref.projection_dim
    for ours, theirs in ((cfg.text_config, ref.text_config), (cfg.vision_config, ref.vision_config)):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                      "layer_norm_eps"):
            assert getattr(ours, field) == getattr(theirs, field), field


def test_legacy_config_dict_keys_override(folder):
    d = json.loads((folder / "config.json").read_text())
    d["text_config_dict"] = {"layer_norm_eps": 1e-3}
    d["vision_config_dict"] = {"hidden_act": "gelu"}
    cfg = CLIPConfig.from_dict(d)
    assert cfg.text_config.layer_norm_eps == 1e-3 and cfg.vision_config.hidden_act == "gelu"
    assert cfg.text_config.hidden_size == d["text_config"]["hidden_size"]


def test_unknown_activation_is_an_error(folder):
    d = json.loads((folder / "config.json").read_text())
    d["vision_config"]["hidden_act"] = "swish"
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json: vision_config.hidden_act is 'swish'.*quick_gelu"):
        tinyclip.load(folder, device=DEVICE)


@pytest.mark.parametrize("text, match", [
    ("{not json", r"config.json: not valid JSON"),
    ("[1, 2]", r"config.json: expected a JSON object"),
    ('{"model_type": "bert"}', r"model_type is 'bert'; tinyclip loads CLIPModel"),
    ('{"text_config": {"hidden_size": "big"}}', r"text_config.hidden_size must be int, got 'big'"),
    ('{"vision_config": {"num_hidden_layers": -1}}', r"vision_config.num_hidden_layers must be positive"),
    ('{"vision_config": {"image_size": 225, "patch_size": 32}}', r"image_size 225 is not a multiple of patch_size 32"),
    ('{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}', r"hidden_size 30 is not a multiple"),
    ('{"text_config": 5}', r"text_config must be a JSON object"),
])
def test_bad_config_json(folder, text, match):
    (folder / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        tinyclip.load(folder, device=DEVICE)


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config.json"):
        tinyclip.load(folder, device=DEVICE)


# ---- keys and shapes -----------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_are_reported_together(folder):
    st = folder / "model.safetensors"
    tensors = load_file(st)
    del tensors["text_projection.weight"], tensors["vision_model.post_layernorm.bias"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["visual_projection.weight"] = np.zeros((5, 5), np.float32)
    save_file(tensors, st)
    with pytest.raises(CheckpointError) as e:
        tinyclip.load(folder, device=DEVICE)
    msg = str(e.value)
    assert "2 missing keys" in msg and "text_projection.weight" in msg and "vision_model.post_layernorm.bias" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "1 shape mismatches" in msg and "visual_projection.weight: checkpoint [5, 5], config.json implies [24, 40]" in msg


def test_position_ids_buffers_are_ignored(folder):
    st = folder / "model.safetensors"
    tensors = load_file(st)
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.float32)[None]
    save_file(tensors, st)
    tinyclip.load(folder, device=DEVICE)


def test_float16_checkpoint_loads_as_float32(folder, tiny_quick):
    st = folder / "model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(st).items()}, st)
    model = tinyclip.load(folder, device=DEVICE)
    want = load_file(st)["text_projection.weight"].astype(np.float32)
    with model.backend.context():   # dense_weight: (out, in) also where the cpu backend stores panels
        np.testing.assert_array_equal(model.model.text_projection.dense_weight.numpy(), want)


def test_sharded_checkpoint_equals_single_file(folder, tiny_quick):
    st = folder / "model.safetensors"
    tensors = load_file(st)
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    single = tinyclip.load(folder, device=DEVICE).encode_text(["a cat"])
    st.unlink()
    sharded = tinyclip.load(folder, device=DEVICE).encode_text(["a cat"])
    np.testing.assert_array_equal(single, sharded)


@pytest.mark.parametrize("bad", ["../model.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_shard_index_pointing_outside_the_folder_is_refused(folder, bad):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"logit_scale": bad}}))
    with pytest.raises(CheckpointError, match=r"points to .*plain file names inside the checkpoint folder"):
        tinyclip.load(folder, device=DEVICE)


def test_shard_index_naming_a_missing_file(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"logit_scale": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lists shard\(s\) gone.safetensors that are not in"):
        tinyclip.load(folder, device=DEVICE)


def test_pytorch_bin_only_is_refused_without_unpickling(folder):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 this would be a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin but no model.safetensors.*never unpickles.*Convert"):
        tinyclip.load(folder, device=DEVICE)


def test_folder_without_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        tinyclip.load(folder, device=DEVICE)


# ---- corrupt safetensors -------------------------------------------------------------------------

def test_truncated_file(folder):
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*': data_offsets .* lie outside"):
        tinyclip.load(folder, device=DEVICE)


@pytest.mark.parametrize("content, match", [
    (b"", r"truncated safetensors file \(0 bytes"),
    (b"\x05\x00", r"truncated safetensors file \(2 bytes"),
    (struct.pack("<Q", 10**9) + b"{}", r"header length 1000000000 runs past the end of the file"),
    (struct.pack("<Q", 4) + b"nope", r"header is not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", r"header is not a JSON object"),
    (struct.pack("<Q", 3) + b"\xff\xfe{", r"header is not valid JSON"),
])
def test_corrupt_headers(folder, content, match):
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        tinyclip.load(folder, device=DEVICE)


@pytest.mark.parametrize("entry, match", [
    (dict(dtype="Q99"), r"tensor 'logit_scale' has an unknown dtype 'Q99'"),
    (dict(dtype="I64", data_offsets=[0, 16]), r"has a non-float dtype 'I64'"),
    (dict(shape=[2, -1]), r"shape \[2, -1\] is not a list of non-negative integers"),
    (dict(shape="2"), r"shape '2' is not a list"),
    (dict(data_offsets=[0]), r"data_offsets \[0\] is not a pair of integers"),
    (dict(data_offsets=[8, 4]), r"data_offsets \[8, 4\] lie outside"),
    (dict(data_offsets=[0, 4]), r"4 bytes stored but dtype F32 and shape \[2\] need 8"),
    (dict(shape=[10**12, 10**12]), r"bytes stored but dtype F32 and shape \[1000000000000, 1000000000000\] need"),
])
def test_bad_header_entries(folder, entry, match):
    one_tensor_file(folder / "model.safetensors", **entry)
    with pytest.raises(CheckpointError, match=match):
        tinyclip.load(folder, device=DEVICE)


def test_overlapping_tensors(folder):
    write_raw(folder / "model.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensors 'a' and 'b' overlap"):
        tinyclip.load(folder, device=DEVICE)


def test_duplicate_keys_in_header(folder):
    raw = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"duplicate key 'a'"):
        tinyclip.load(folder, device=DEVICE)


# ---- the tokenizer's vocabulary -------------------------------------------------------------------

TEXTS = ["a photo of a cat", "ΣΑΣ and <|endoftext|> twice", "don't stop"]


def _without_vocabulary(folder, tokenizer_class):
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        (folder / name).unlink(missing_ok=True)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config.pop("tokenizer_class", None)
    if tokenizer_class:
        config["tokenizer_class"] = tokenizer_class
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("tokenizer_class", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_a_clip_tokenizer_without_vocabulary_files_uses_clips_shipped_bpe(folder, tiny_quick, tokenizer_class):
    """tokenizer_config.json names CLIP's tokenizer: the vocabulary shipped with tinyclip gives the ids
    the folder's own vocab.json and merges.txt gave."""
    want = tinyclip.load(tiny_quick.folder, device=DEVICE).tokenize(TEXTS)
    _without_vocabulary(folder, tokenizer_class)
    np.testing.assert_array_equal(tinyclip.load(folder, device=DEVICE).tokenize(TEXTS), want)


@pytest.mark.parametrize("tokenizer_class", [None, "BertTokenizer"])
def test_another_tokenizer_without_vocabulary_files_is_an_error(folder, tokenizer_class):
    from tinyclip.errors import TokenizerError
    _without_vocabulary(folder, tokenizer_class)
    model = tinyclip.load(folder, device=DEVICE)     # the tokenizer is read on first use
    with pytest.raises(TokenizerError, match="vocab.json is missing"):
        model.tokenize(TEXTS)


def test_images_are_embedded_without_reading_the_tokenizer(folder, tiny_quick):
    """The tokenizer's files are read the first time texts need them: a process that embeds images
    reads none of them (a broken vocab.json does not stop it), and the first text call raises."""
    from tinyclip.errors import TokenizerError
    pixels = np.random.default_rng(0).integers(0, 256, (2, 40, 50, 3), dtype=np.uint8)
    want = tinyclip.load(tiny_quick.folder, device=DEVICE).encode_image(list(pixels))
    (folder / "vocab.json").write_text("{")
    model = tinyclip.load(folder, device=DEVICE)
    for both in (model.similarity, model.logits):     # texts first: the error comes before the images' work
        with pytest.raises(TokenizerError, match=r"vocab.json: not valid JSON"):
            both(list(pixels), ["a photo"])
    assert "image" in model.towers.pending
    np.testing.assert_array_equal(model.encode_image(list(pixels)), want)
    for text_call in (model.tokenize, model.encode_text):
        with pytest.raises(TokenizerError, match=r"vocab.json: not valid JSON"):
            text_call(["a photo"])
