"""Zero-shot classification, similarity and the file helpers, against transformers' CLIPModel.

tinygrad schedules and compiles anew for every input shape, so these tests keep to a few batch
shapes: all six images, and four texts (or 32 for the ImageNet templates).
"""
import shutil

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPTokenizer
from transformers.image_utils import load_image

import tinyclip
from tinyclip import tasks
from tinyclip.templates import IMAGENET_TEMPLATES
from tests.conftest import ROOT

PROB_ATOL = 1e-5        # max |ours - theirs| for probabilities and cosines
EMBED_REL_TOL = 1e-5    # embeddings: max |ours - theirs| / max |theirs|
RANKED_ATOL = 1e-7      # ranked() returns the matrix's own float32 values, only reordered
DEVICE = "cpu"
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
LABELS = ["cat", "cup of coffee", "rocket", "astronaut"]


@pytest.fixture(scope="module")
def model(tiny_quick):
    return tinyclip.load(tiny_quick.folder, device=DEVICE)


@pytest.fixture(scope="module")
def oracle_pixels(tiny_quick):
    """transformers' pixels for IMAGES: its load_image (as for a file path), then CLIPImageProcessor."""
    processor = CLIPImageProcessor.from_pretrained(tiny_quick.folder)
    return torch.from_numpy(processor([load_image(str(p)) for p in IMAGES], return_tensors="np").pixel_values)


def text_features(ck, texts):
    with torch.no_grad():
        out = ck.torch_model.get_text_features(**token_ids(ck, texts))
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy().astype(np.float64)


def image_features(ck, pixels):
    with torch.no_grad():
        out = ck.torch_model.get_image_features(pixel_values=pixels)
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy().astype(np.float64)


def token_ids(ck, texts):
    # the test checkpoints carry no tokenizer_config.json: pad as openai/clip-vit-* do
    tok = CLIPTokenizer.from_pretrained(ck.folder, pad_token="<|endoftext|>")
    length = ck.config.text_config.max_position_embeddings
    return {"input_ids": tok(texts, padding="max_length", truncation=True, max_length=length,
                             return_tensors="pt").input_ids}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ensembled_probs(ck, pixels, labels, templates):
    """OpenAI's recipe on transformers' features: per label, normalise each prompt's embedding,
    average, normalise again; then softmax(exp(logit_scale) * cosine)."""
    label_embeds = np.stack([unit(unit(text_features(ck, [t.replace("{}", label) for t in templates])).mean(0))
                             for label in labels])
    scale = float(ck.torch_model.logit_scale.detach().exp())
    return softmax(scale * unit(image_features(ck, pixels)) @ label_embeds.T)


# ---- classify ------------------------------------------------------------------------------------

def test_classify_without_templates_is_softmax_of_logits_per_image(model, tiny_quick, oracle_pixels):
    with torch.no_grad():
        logits = tiny_quick.torch_model(**token_ids(tiny_quick, LABELS), pixel_values=oracle_pixels).logits_per_image
    probs = model.classify(IMAGES, LABELS, templates=None)
    assert probs.shape == (len(IMAGES), len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, softmax(logits.numpy().astype(np.float64)), rtol=0, atol=PROB_ATOL)


def test_classify_ensembles_the_imagenet_templates_as_openai(model, tiny_quick, oracle_pixels):
    labels = LABELS[:2]    # 2 x 80 prompts: five batches of 32
    expected = ensembled_probs(tiny_quick, oracle_pixels, labels, IMAGENET_TEMPLATES)
    np.testing.assert_allclose(model.classify(IMAGES, labels), expected, rtol=0, atol=PROB_ATOL)


def test_classify_with_custom_templates(model, tiny_quick, oracle_pixels):
    labels, templates = LABELS[2:], ["a blurry {}", "{}, seen from far away"]
    expected = ensembled_probs(tiny_quick, oracle_pixels, labels, templates)
    np.testing.assert_allclose(model.classify(IMAGES, labels, templates=templates), expected, rtol=0, atol=PROB_ATOL)


def test_top_gives_the_best_labels_first(model):
    probs = model.classify(IMAGES, LABELS, templates=None)
    best = model.classify(IMAGES, LABELS, templates=None, top=2)
    assert len(best) == len(IMAGES)
    for row, ranked in zip(probs, best):
        order = np.argsort(-row)[:2]
        assert [label for label, _ in ranked] == [LABELS[j] for j in order]
        np.testing.assert_allclose([p for _, p in ranked], row[order], rtol=0, atol=RANKED_ATOL)
    assert [len(r) for r in model.classify(IMAGES, LABELS, templates=None, top=99)] == [len(LABELS)] * len(IMAGES)


def test_label_embeddings_are_cached_per_label_and_templates(model, monkeypatch):
    model.label_cache.clear()
    encoded = []
    encode_text = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda texts, **kw: (encoded.append(list(texts)),
                                                                    encode_text(texts, **kw))[1])
    templates = ["a photo of a {}.", "a drawing of a {}."]

    first = model.classify(IMAGES, ["cat", "dog"], templates=templates)
    assert sum(map(len, encoded)) == 4
    again = model.classify(IMAGES, ["cat", "dog"], templates=templates)
    assert sum(map(len, encoded)) == 4, "the same labels and templates were encoded again"
    np.testing.assert_array_equal(first, again)
    model.classify(IMAGES, ["dog", "cat", "bird", "fish"], templates=templates)
    assert encoded[-1] == ["a photo of a bird.", "a drawing of a bird.", "a photo of a fish.",
                           "a drawing of a fish."], "only the new labels are encoded"
    model.classify(IMAGES, ["cat", "dog", "bird", "fish"], templates=None)
    assert encoded[-1] == ["cat", "dog", "bird", "fish"], "other templates are another cache entry"


def test_imagenet_templates_are_the_80_of_the_clip_paper():
    assert len(IMAGENET_TEMPLATES) == len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert tasks.resolve_templates("imagenet") == IMAGENET_TEMPLATES
    assert tasks.resolve_templates(None) == ("{}",)
    assert tasks.resolve_templates("itap of a {}") == ("itap of a {}",)


@pytest.mark.parametrize("labels, templates, top, message", [
    ([], "imagenet", None, "no labels"),
    ("cat", "imagenet", None, "single string"),
    (["cat", "cat"], None, None, "distinct"),
    (["cat", " "], None, None, "label 2 of 2 is empty"),
    (["cat"], ["a photo of a {}", "a photo"], None, "template 2 of 2 ('a photo') has no '{}'"),
    (["cat"], "not-a-template-set", None, "neither a template"),
    (["cat"], [], None, "empty list"),
    (["cat"], None, 0, "top must be a positive integer, got 0"),
])
def test_bad_arguments_are_usage_errors(model, labels, templates, top, message):
    with pytest.raises(tasks.UsageError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        model.classify(IMAGES[:1], labels, templates=templates, top=top)
    assert isinstance(e.value, ValueError) and isinstance(e.value, tinyclip.TinyClipError)


def test_a_missing_image_is_an_image_error(model):
    with pytest.raises(tinyclip.ImageError, match="no-such.png"):
        model.classify(["no-such.png"], ["cat"], templates=None)


# ---- similarity ----------------------------------------------------------------------------------

def test_similarity_is_the_cosine_of_transformers_features(model, tiny_quick, oracle_pixels):
    texts = ["a photo of a cat", "an astronaut", "", "a cup of coffee on a table"]
    expected = unit(image_features(tiny_quick, oracle_pixels)) @ unit(text_features(tiny_quick, texts)).T
    sims = model.similarity(IMAGES, texts)
    assert sims.shape == (len(IMAGES), len(texts)) and sims.dtype == np.float32
    np.testing.assert_allclose(sims, expected, rtol=0, atol=PROB_ATOL)


# ---- files ---------------------------------------------------------------------------------------

def test_find_images_recurses_in_sorted_order_and_skips_hidden_and_other_files(tmp_path):
    for name in ["b.PNG", "a.jpg", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", ".hidden.png", ".git/e.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = list(tasks.find_images([tmp_path, tmp_path / "notes.txt"]))
    assert found == [str(tmp_path / n) for n in ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt"]]
    with pytest.raises(tinyclip.ImageError, match="no such file or folder"):
        list(tasks.find_images([tmp_path / "missing"]))


def test_embed_image_files_skips_unreadable_files_and_batches(model, tmp_path, tiny_quick, oracle_pixels):
    good = [shutil.copy(p, (tmp_path / sub).mkdir(exist_ok=True) or tmp_path / sub / p.name)
            for sub in ("a", "b") for p in IMAGES]
    (tmp_path / "a" / "corrupt.png").write_bytes(IMAGES[0].read_bytes()[:300])
    (tmp_path / "b" / "text.jpg").write_text("not an image")
    skipped = []
    batches = list(tasks.embed_image_files(model, tasks.find_images([tmp_path]), batch_size=len(IMAGES),
                                           on_skip=lambda path, reason: skipped.append((path, reason))))
    assert [len(paths) for paths, _ in batches] == [len(IMAGES), len(IMAGES)]
    paths = [p for batch, _ in batches for p in batch]
    assert sorted(paths) == sorted(map(str, good))
    assert [p for p, _ in skipped] == [str(tmp_path / "a" / "corrupt.png"), str(tmp_path / "b" / "text.jpg")]
    assert all(reason and not reason.startswith(str(tmp_path)) for _, reason in skipped), skipped
    embeds = np.concatenate([e for _, e in batches])
    theirs = image_features(tiny_quick, oracle_pixels)[[[str(p) for p in good].index(p) % len(IMAGES)
                                                         for p in paths]]
    assert np.abs(embeds - theirs).max() / np.abs(theirs).max() <= EMBED_REL_TOL


def test_top_indices_orders_best_first_and_keeps_ties_in_index_order():
    scores = np.array([0.1, 0.5, 0.3, 0.5, 0.9, 0.5])
    assert tasks.top_indices(scores).tolist() == [4, 1, 3, 5, 2, 0]
    assert tasks.top_indices(scores, 3).tolist() == [4, 1, 3]
    assert tasks.top_indices(scores, 2).tolist() == [4, 1]
    assert tasks.top_indices(scores, 10).tolist() == [4, 1, 3, 5, 2, 0]
