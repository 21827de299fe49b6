"""open_clip checkpoints load directly and equal open_clip (the oracle), offline.

open_clip runs in its own environment, `.venv-openclip` (see tests/openclip_oracle.py for why),
as a subprocess: it builds random-init models with its own create_model, saves them in the hub
layout (open_clip_config.json + open_clip_model.safetensors), reads them back with its own loader
and writes its tokens, pixels, features and logits, which tinyclip must reproduce.
"""
import fnmatch
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from tinygrad import dtypes
from tinygrad.nn.state import get_state_dict

import tinyclip
from tests.bpe import BOS, EOS, clip_vocab, write_clip_vocab
from tests.conftest import ROOT
from tests.test_hub import make_cache
from tests.test_tokenizer import CORPUS
from tinyclip import checkpoints, clip_bpe, hub
from tinyclip.config import CLIPConfig
from tinyclip.errors import CheckpointError, ConfigError, TokenizerError, UsageError
from tinyclip.model import CLIPModel
from tinyclip.checkpoints.open_clip import OpenClipImageProcessor, OpenClipTokenizer
from tinyclip.checkpoints.open_clip import config as oc_config, weights as oc_weights

ORACLE_PYTHON = ROOT / ".venv-openclip" / "bin" / "python"
ORACLE_SCRIPT = ROOT / "tests" / "openclip_oracle.py"
ORACLE_TIMEOUT_S = 900
PIXEL_ATOL = 1e-5          # pixels, absolute (normalized values are O(1))
EMBED_RTOL = 1e-5          # features and logits, relative to the largest magnitude of each
BACKENDS = ("cpu", "cpu-llvm", "opencl")
REAL_NAME = "ViT-B-32"     # the one real architecture built in full (the smallest)

# Tiny configs that between them use both activations, both pooling rules, both text key layouts
# (custom_text), an mlp_ratio that truncates, short contexts, and every resize mode and filter.
TINY = {
    "oc-tiny-quick": (
        {"embed_dim": 24, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8,
                        "mlp_ratio": 3.0},
         "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2}},
        {"interpolation": "bilinear", "resize_mode": "longest", "fill_color": 128,
         "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}),
    "oc-tiny-gelu": (
        {"embed_dim": 40, "custom_text": True,
         "vision_cfg": {"image_size": 42, "layers": 2, "width": 44, "head_width": 11, "patch_size": 14,
                        "mlp_ratio": 4.3637, "final_ln_after_pool": True},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 36, "heads": 3, "layers": 3,
                      "mlp_ratio": 2.5, "pool_type": "eos", "eos_id": 49407}},
        {"resize_mode": "squash"}),
}
# OpenAI's ModifiedResNet towers: odd widths (a 9-channel stem), one stage of two blocks, a real
# RN50's widths on fewer blocks, and batch norms with running statistics (tests/openclip_oracle.py).
RESNET_TEXT = {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
RESNET = {
    "oc-rn-odd": ({"embed_dim": 20, "quick_gelu": True,
                   "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 18, "head_width": 36,
                                  "patch_size": None},
                   "text_cfg": RESNET_TEXT}, {}),
    "oc-rn50-widths": ({"embed_dim": 64,
                        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 64, "patch_size": None},
                        "text_cfg": RESNET_TEXT}, {"interpolation": "bilinear"}),
}
RESNET_ARCHITECTURES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"]
F16_RTOL = 1e-2            # validate.py's float16 tolerance
BF16_COSINE = 0.999        # validate.py's bfloat16 tolerance (every embedding's cosine)


def bf16_runs() -> bool:
    from tinyclip import registry
    cpu = registry.select("cpu")
    return cpu.available and "bfloat16" in cpu.usable_dtypes
TEXTS = ["a photo of a cat", "A DOG &amp; friends", "<start_of_text>hello<end_of_text> world",
         "a long caption " * 12, "emoji 🏽 and ΣΑΣ"]
# Ids given directly: the end token repeated, or missing (argmax and eos pooling then differ).
IDS = [[49406, 320, 49407, 320, 49407], [49406, 320, 1125, 539, 320]]   # zero-padded to the context length
CLIP_ARCHITECTURES = [f"{base}{q}" for base in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14")
                      for q in ("", "-quickgelu")] + ["ViT-g-14"]


def run_oracle(jobs: list, workdir) -> None:
    if not ORACLE_PYTHON.exists():
        pytest.fail(f"the open_clip oracle environment {ORACLE_PYTHON.parent.parent} is missing; run "
                    "`bash .ci/run` (it creates .venv-openclip with torch 2.14.1, torchvision 0.29.1 and "
                    "open-clip-torch)")
    job_file = workdir / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    done = subprocess.run([str(ORACLE_PYTHON), str(ORACLE_SCRIPT), str(job_file)], capture_output=True, text=True,
                          timeout=ORACLE_TIMEOUT_S, cwd=ROOT)
    if done.returncode:
        pytest.fail(f"the open_clip oracle failed:\n{done.stderr[-4000:]}")


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list:
    """The photos, plus odd shapes and modes: rounding of the crop, padding, alpha and grayscale."""
    folder = tmp_path_factory.mktemp("oc-images")
    rng = np.random.default_rng(0)
    extra = {"rgba-37x50.png": Image.fromarray(rng.integers(0, 256, (50, 37, 4), dtype=np.uint8), "RGBA"),
             "gray-301x200.png": Image.fromarray(rng.integers(0, 256, (200, 301), dtype=np.uint8), "L"),
             "rgb-45x46.png": Image.fromarray(rng.integers(0, 256, (46, 45, 3), dtype=np.uint8), "RGB"),
             "thin-9x120.png": Image.fromarray(rng.integers(0, 256, (120, 9, 3), dtype=np.uint8), "RGB")}
    for name, image in extra.items():
        image.save(folder / name)
    photos = sorted(p for p in (ROOT / "tests" / "data" / "images").iterdir() if p.suffix in (".png", ".jpg"))
    return [str(p) for p in photos] + [str(folder / n) for n in extra]


class Built:
    def __init__(self, folder, oracle):
        self.folder, self.oracle = folder, oracle


@pytest.fixture(scope="session")
def built(tmp_path_factory, images) -> dict:
    """Every model of the suite, built and answered by open_clip in one oracle run."""
    work = tmp_path_factory.mktemp("openclip")
    jobs = []
    for seed, (name, (model_cfg, preprocess_cfg)) in enumerate([*TINY.items(), (REAL_NAME, (None, {}))]):
        folder = work / name
        context = model_cfg["text_cfg"]["context_length"] if model_cfg else None
        jobs.append({"kind": "build", "folder": str(folder), "seed": seed, "preprocess_cfg": preprocess_cfg,
                     **({"model_cfg": model_cfg} if model_cfg else {"name": name}),
                     "texts": TEXTS, "images": images,
                     "ids": [r + [0] * (context - len(r)) for r in IDS] if model_cfg else None,
                     "out": str(work / f"{name}.npz")})
    run_oracle(jobs, work)
    out = {}
    for job in jobs:
        folder = pathlib.Path(job["folder"])
        write_clip_vocab(folder)   # as open_clip repositories on the hub carry CLIP's vocab.json and merges.txt
        out[folder.name] = Built(folder, dict(np.load(job["out"])))
    return out


# ---- tokenizer ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_tokens(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("oc-tokens")
    run_oracle([{"kind": "tokens", "name": REAL_NAME, "texts": CORPUS, "out": str(work / "t.npz")}], work)
    return dict(np.load(work / "t.npz"))


def test_tokens_equal_open_clip_on_the_hard_corpus(corpus_tokens, tmp_path):
    oracle = corpus_tokens
    write_clip_vocab(tmp_path)
    ours = OpenClipTokenizer.from_pretrained(tmp_path)(CORPUS)
    differ = [(CORPUS[i], ours[i].tolist(), oracle["tokens"][i].tolist())
              for i in np.flatnonzero((ours != oracle["tokens"]).any(1))]
    assert not differ, f"{len(differ)} texts differ; first: {differ[0]}"


def test_open_clips_vocabulary_is_clips_vocab_json(corpus_tokens):
    """tinyclip reads vocab.json/merges.txt; open_clip's packaged BPE must give the same ids
    (only the start/end token names differ)."""
    encoder = json.loads(str(corpus_tokens["encoder"]))
    vocab, _ = clip_vocab()
    renamed = {{BOS: "<start_of_text>", EOS: "<end_of_text>"}.get(k, k): v for k, v in vocab.items()}
    assert encoder == renamed


def test_the_shipped_vocabulary_is_open_clips_and_vocab_json_id_for_id(corpus_tokens):
    """CLIP's BPE inside tinyclip gives open_clip's own encoder and the openai/clip-vit-* files'
    vocab.json and merges.txt (tests/bpe.py's derivation), id for id and merge for merge."""
    vocab, merges = clip_bpe.vocab_and_merges()
    encoder = json.loads(str(corpus_tokens["encoder"]))
    assert {{BOS: "<start_of_text>", EOS: "<end_of_text>"}.get(k, k): v for k, v in vocab.items()} == encoder
    assert (vocab, list(merges)) == clip_vocab()


def test_a_folder_without_the_vocabulary_uses_the_shipped_one(built, tmp_path):
    """open_clip saves no vocab.json or merges.txt for its default tokenizer; the folder still
    tokenizes as open_clip does."""
    b = built["oc-tiny-quick"]
    folder = _copy(b, tmp_path)
    (folder / "vocab.json").unlink()
    (folder / "merges.txt").unlink()
    np.testing.assert_array_equal(tinyclip.load(folder, device="cpu").tokenize(TEXTS), b.oracle["tokens"])


def test_a_folder_saved_by_open_clips_save_for_hf_loads_and_equals_open_clip(tmp_path, images):
    """open_clip.push_to_hf_hub.save_for_hf (what push_to_hf_hub uploads) writes the folder."""
    model_cfg, _ = TINY["oc-tiny-quick"]
    folder = tmp_path / "saved"
    run_oracle([{"kind": "save_for_hf", "folder": str(folder), "model_cfg": model_cfg, "seed": 5, "texts": TEXTS,
                 "images": images, "out": str(tmp_path / "saved.npz")}], tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    oracle = dict(np.load(tmp_path / "saved.npz"))
    model = tinyclip.load(folder, device="cpu")
    np.testing.assert_array_equal(model.tokenize(TEXTS), oracle["tokens"])
    pil = [Image.open(p) for p in images]   # as the oracle opens them (a path is made RGB before resizing)
    assert relative_error(model.encode_image(pil), oracle["image_embeds"]) < EMBED_RTOL
    assert relative_error(model.encode_text(TEXTS), oracle["text_embeds"]) < EMBED_RTOL


def test_a_hugging_face_tokenizer_is_refused_by_name():
    cfg = {**BASE, "text_cfg": {**BASE["text_cfg"], "hf_tokenizer_name": "xlm-roberta-base"}}
    with pytest.raises(TokenizerError, match=r"hf_tokenizer_name is 'xlm-roberta-base', a Hugging Face tokenizer "
                                             r"that tinyclip cannot read") as e:
        oc_config.spec_from_dict(cfg, {}, "open_clip_config.json")
    assert "\n" not in str(e.value)


def test_model_tokenize_uses_the_context_length_and_zero_padding(built):
    b = built["oc-tiny-quick"]
    model = tinyclip.load(b.folder, device="cpu")
    np.testing.assert_array_equal(model.tokenize(TEXTS), b.oracle["tokens"])
    assert model.tokenize(["a"]).shape == (1, 20) and model.tokenize(["a"])[0, -1] == 0


# ---- preprocessing --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*TINY, REAL_NAME])
def test_pixels_equal_open_clip(built, images, name):
    b = built[name]
    processor = tinyclip.load(b.folder, device="cpu").processor
    assert isinstance(processor, OpenClipImageProcessor)
    for i, path in enumerate(images):
        ours = processor(Image.open(path))[0]
        np.testing.assert_allclose(ours, b.oracle["pixels"][i], rtol=0, atol=PIXEL_ATOL, err_msg=path)


def test_uint8_arrays_preprocess_as_their_pil_images(images):
    processor = OpenClipImageProcessor(size=40, resize_mode="longest", fill_color=7)
    for path in images:
        image = Image.open(path)
        if image.mode in ("RGB", "RGBA", "L"):
            np.testing.assert_array_equal(processor(np.asarray(image)), processor(image))


# ---- model ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TINY))
def test_features_and_logits_equal_open_clip(built, name, backend):
    b = built[name]
    model = tinyclip.load(b.folder, device=backend)
    pixels = b.oracle["pixels"].astype(np.float32)
    ids = b.oracle["tokens"]
    img, txt = model.encode_image(pixels), model.encode_text(ids)
    assert relative_error(img, b.oracle["image_embeds"]) <= EMBED_RTOL
    assert relative_error(txt, b.oracle["text_embeds"]) <= EMBED_RTOL
    assert relative_error(model.logits_from_embeddings(img, txt), b.oracle["logits"]) <= EMBED_RTOL
    # Pooling on ids without, or with a repeated, end token: argmax and eos differ there.
    assert relative_error(model.encode_text(b.oracle["ids"]), b.oracle["text_embeds_ids"]) <= EMBED_RTOL


def test_real_architecture_equals_open_clip(built):
    b = built[REAL_NAME]
    model = tinyclip.load(b.folder, device="cpu")
    img = model.encode_image(b.oracle["pixels"].astype(np.float32))
    txt = model.encode_text(TEXTS)
    np.testing.assert_array_equal(model.tokenize(TEXTS), b.oracle["tokens"])
    assert relative_error(img, b.oracle["image_embeds"]) <= EMBED_RTOL
    assert relative_error(txt, b.oracle["text_embeds"]) <= EMBED_RTOL
    assert relative_error(model.logits_from_embeddings(img, txt), b.oracle["logits"]) <= EMBED_RTOL


# ---- configs: every ViT CLIP open_clip defines ------------------------------------------------------

@pytest.fixture(scope="module")
def open_clip_configs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("oc-configs")
    names = CLIP_ARCHITECTURES + RESNET_ARCHITECTURES + ["coca_ViT-B-32", "ViT-B-16-SigLIP", "xlm-roberta-base-ViT-B-32",
                                  "convnext_base", "ViT-H-14-CLIPA", "ViT-M-16-alt", "EVA02-B-16"]
    run_oracle([{"kind": "configs", "names": names, "models": CLIP_ARCHITECTURES + RESNET_ARCHITECTURES,
                 "out": str(work / "configs.json")}],
               work)
    return json.loads((work / "configs.json").read_text())


@pytest.mark.parametrize("name", CLIP_ARCHITECTURES)
def test_config_maps_every_open_clip_parameter(open_clip_configs, name):
    entry = open_clip_configs[name]
    spec = oc_config.spec_from_dict(entry["model_cfg"], {}, name)
    model = CLIPModel(spec.config, device="CPU")   # parameters are not allocated until realized
    plan = oc_weights.key_map(spec.config)
    params = get_state_dict(model)
    assert set(plan) == set(params)
    assert {source for source, _ in plan.values()} == set(entry["shapes"])
    for key, param in params.items():
        source, how = plan[key]
        assert list(oc_weights.stored_shape(tuple(param.shape), how)) == entry["shapes"][source], key
    for tower, cfg in (("vision", spec.config.vision_config), ("text", spec.config.text_config)):
        block = entry["blocks"][tower]
        assert cfg.hidden_act == {"QuickGELU": "quick_gelu", "GELU": "gelu"}[block["act"]]
        assert block["approximate"] in (None, "none")
        assert cfg.num_attention_heads == block["heads"] and cfg.layer_norm_eps == block["eps"]
    assert entry["text_pool"] == "argmax" and spec.config.text_config.eos_token_id == oc_config.ARGMAX_POOLING


@pytest.mark.parametrize("name", RESNET_ARCHITECTURES)
def test_config_maps_every_open_clip_resnet_parameter(open_clip_configs, name):
    """Each of OpenAI's ResNet CLIPs: every open_clip tensor is a parameter's source or a batch
    norm's statistic, at the shape open_clip builds."""
    entry = open_clip_configs[name]
    spec = oc_config.spec_from_dict(entry["model_cfg"], {}, name)
    params = get_state_dict(CLIPModel(spec.config, device="CPU"))
    plan = oc_weights.key_map(spec.config)
    assert set(plan) == set(params)
    theirs = {k: v for k, v in entry["shapes"].items() if not k.endswith(".num_batches_tracked")}
    ours = {source: list(oc_weights.stored_shape(tuple(params[k].shape), how)) for k, (source, how) in plan.items()}
    for key, (source, how) in plan.items():
        if isinstance(how, oc_weights.Fold) and how.part == "bias":
            ours |= {f"{how.bn}.{stat}": list(params[key].shape) for stat in oc_weights.BN_STATS}
    assert ours == theirs
    assert spec.config.vision_config.heads == entry["heads"]
    assert entry["text_pool"] == "argmax"


@pytest.fixture(scope="module")
def built_resnet(tmp_path_factory, images) -> dict:
    work = tmp_path_factory.mktemp("openclip-resnet")
    jobs = [{"kind": "build", "folder": str(work / name), "seed": 10 + seed, "preprocess_cfg": preprocess_cfg,
             "model_cfg": model_cfg, "texts": TEXTS, "images": images, "out": str(work / f"{name}.npz")}
            for seed, (name, (model_cfg, preprocess_cfg)) in enumerate(RESNET.items())]
    run_oracle(jobs, work)
    return {job["folder"].rsplit("/", 1)[1]: Built(pathlib.Path(job["folder"]), dict(np.load(job["out"])))
            for job in jobs}


@pytest.mark.parametrize("name, backend", [("oc-rn-odd", b) for b in BACKENDS] + [("oc-rn50-widths", "cpu")])
def test_resnet_features_and_logits_equal_open_clip(built_resnet, images, name, backend):
    b = built_resnet[name]
    model = tinyclip.load(b.folder, device=backend)
    pil = [Image.open(p) for p in images]   # as the oracle opens them (a path is made RGB before resizing)
    np.testing.assert_allclose(model.preprocess(pil), b.oracle["pixels"], rtol=0, atol=PIXEL_ATOL)
    img, txt = model.encode_image(pil), model.encode_text(TEXTS)
    assert relative_error(img, b.oracle["image_embeds"]) <= EMBED_RTOL
    assert relative_error(txt, b.oracle["text_embeds"]) <= EMBED_RTOL
    assert relative_error(model.logits_from_embeddings(img, txt), b.oracle["logits"]) <= EMBED_RTOL


def test_resnet_in_float16_stays_within_its_tolerance(built_resnet, images):
    b = built_resnet["oc-rn50-widths"]
    model = tinyclip.load(b.folder, device="cpu", dtype="float16")
    assert relative_error(model.encode_image(b.oracle["pixels"]), b.oracle["image_embeds"]) <= F16_RTOL


@pytest.mark.slow      # ~14 s: the ResNet's image graph compiled
@pytest.mark.skipif(not bf16_runs(), reason="this CPU runs no bfloat16 kernels")
def test_resnet_in_bfloat16_stays_within_its_tolerance(built_resnet):
    """Its convolutions (im2col onto the linear kernel: a 27-input stem, 3x3 and 1x1 layers) and attention pool
    in bfloat16, the pool's output projection in float32: every embedding's cosine with open_clip's float32."""
    b = built_resnet["oc-rn50-widths"]
    model = tinyclip.load(b.folder, device="cpu", dtype="bfloat16")
    assert model.model.visual.conv1.weight.dtype.name == "int"     # the stem runs on bfloat16 pairs
    img = model.encode_image(b.oracle["pixels"])
    want = b.oracle["image_embeds"]
    cosine = (img * want).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= BF16_COSINE and not np.allclose(img, want, rtol=1e-6, atol=0)


def test_resnet_in_int8_quantises_the_linear_layers_only(built_resnet):
    """int8: the linear layers in int8 but the two final projections (the embeddings: the attention pool's
    c_proj and text_projection), the convolutions float32; within int8's tolerance."""
    from tinyclip.model import Conv2d, Linear, walk
    from tests.test_int8 import COS_TOL, PATH
    if isinstance(PATH, str):
        pytest.skip(f"int8 does not run on this CPU: {PATH}")
    b = built_resnet["oc-rn50-widths"]
    model = tinyclip.load(b.folder, device="cpu", dtype="int8")
    layers = list(walk(model.model))
    projections = (model.model.visual.attnpool.c_proj, model.model.text_projection)
    assert all(m.weight.dtype == dtypes.uint8 for m in layers if isinstance(m, Linear) and m not in projections)
    assert all(m.weight.dtype == dtypes.float32 for m in projections)
    assert all(m.weight.dtype == dtypes.float32 for m in layers if isinstance(m, Conv2d))
    ours, theirs = model.encode_image(b.oracle["pixels"]), b.oracle["image_embeds"]
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert cos.min() >= COS_TOL


def test_a_resnet_runs_at_its_own_size_only(built_resnet):
    with pytest.raises(UsageError, match="runs at its own size, 64; interpolation is implemented for ViT"):
        tinyclip.load(built_resnet["oc-rn-odd"].folder, device="cpu", image_size=96)


@pytest.mark.parametrize("name, field", [
    ("coca_ViT-B-32", "multimodal_cfg"), ("ViT-B-16-SigLIP", "init_logit_bias"),
    ("xlm-roberta-base-ViT-B-32", "hf_model_name"), ("convnext_base", "timm_model_name"),
    ("ViT-H-14-CLIPA", "no_ln_pre"), ("ViT-M-16-alt", "ls_init_value"), ("EVA02-B-16", "timm_model_name")])
def test_variants_tinyclip_cannot_run_are_refused_by_name(open_clip_configs, name, field):
    with pytest.raises(ConfigError, match=field):
        oc_config.spec_from_dict(open_clip_configs[name]["model_cfg"], {}, name)


BASE = TINY["oc-tiny-quick"][0]


@pytest.mark.parametrize("where, key, value", [
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "pool_type", "avg"), ("vision_cfg", "output_tokens", True),
    ("vision_cfg", "no_ln_pre", True), ("text_cfg", "proj_bias", True), ("text_cfg", "pool_type", "last"),
    ("text_cfg", "embed_cls", True), ("text_cfg", "no_causal_mask", True), ("vision_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("text_cfg", "tokenizer_kwargs", {"clean": "whitespace"}), ("vision_cfg", "some_new_flag", True),
    ("", "init_logit_bias", -10.0)])
def test_each_unsupported_setting_is_named(where, key, value):
    cfg = json.loads(json.dumps(BASE))
    (cfg[where] if where else cfg)[key] = value
    with pytest.raises(ConfigError, match=key):
        oc_config.spec_from_dict(cfg, {}, "open_clip_config.json")


def test_preprocess_cfg_typos_are_refused():
    with pytest.raises(ConfigError, match="resize_mod"):
        OpenClipImageProcessor.from_dict({"resize_mod": "longest"})
    with pytest.raises(ConfigError, match="interpolation"):
        OpenClipImageProcessor.from_dict({"interpolation": "lanczos"})


# ---- files and the hub ------------------------------------------------------------------------------

def _copy(b, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(b.folder, folder)
    return folder


def test_pickle_weights_are_refused_with_how_to_convert(built, tmp_path):
    folder = _copy(built["oc-tiny-quick"], tmp_path)
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"open_clip_pytorch_model.bin.*never unpickles.*save_file"):
        tinyclip.load(folder, device="cpu")


def test_weight_mismatches_name_the_file_and_keys(built, tmp_path):
    from safetensors.numpy import load_file, save_file
    folder = _copy(built["oc-tiny-quick"], tmp_path)
    path = folder / "open_clip_model.safetensors"
    state = load_file(path)
    del state["visual.ln_pre.weight"]
    state["text_projection"] = state["text_projection"][:, :5]
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file(state, path)
    with pytest.raises(CheckpointError) as e:
        tinyclip.load(folder, device="cpu")
    message = str(e.value)
    assert str(path) in message and "1 missing keys:\n    visual.ln_pre.weight" in message
    assert "unexpected keys:\n    extra.weight" in message
    assert "text_projection: checkpoint [48, 5], open_clip_config.json implies [48, 24]" in message


def test_hub_repo_id_of_an_open_clip_repository_loads_from_the_cache(built, tmp_path):
    b = built["oc-tiny-quick"]
    make_cache(tmp_path, b.folder, repo="tinyclip-tests/open-clip-tiny")
    model = tinyclip.load("tinyclip-tests/open-clip-tiny", device="cpu", cache_dir=tmp_path, local_files_only=True)
    direct = tinyclip.load(b.folder, device="cpu")
    np.testing.assert_array_equal(model.encode_text(["a cat"]), direct.encode_text(["a cat"]))
    assert model.identity["fingerprint"]


def test_download_patterns_take_open_clip_files_but_not_its_pickle():
    def allowed(name):
        return any(fnmatch.fnmatch(name, p) for p in hub.ALLOW_PATTERNS)
    assert allowed("open_clip_config.json") and allowed("open_clip_model.safetensors")
    assert not allowed("open_clip_pytorch_model.bin")


def test_a_transformers_config_beside_open_clip_files_wins(built, tiny_quick, tmp_path):
    """Repositories that carry both formats are read as before, through config.json."""
    folder = tmp_path / "both"
    shutil.copytree(tiny_quick.folder, folder)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(built["oc-tiny-quick"].folder / name, folder / name)
    assert checkpoints.open(folder).format == "huggingface"
    assert tinyclip.load(folder, device="cpu").config == CLIPConfig.from_file(tiny_quick.folder / "config.json")


def test_timms_config_beside_open_clip_files_is_not_a_transformers_one(built, tmp_path):
    """timm's repositories (timm/resnet50_clip.openai, timm/vit_base_patch32_clip_224.openai) carry
    open_clip's files and a config.json of timm's own."""
    folder = _copy(built["oc-tiny-quick"], tmp_path)
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch32_clip_224", "num_classes": 512}))
    checkpoint = checkpoints.open(folder)
    assert checkpoint.format == "open_clip"
    assert checkpoint.weight_files() == [folder / "open_clip_model.safetensors"]
