"""tinyclip's embeddings and logits against transformers' CLIPModel, on the CPU in float32."""
import numpy as np
import pytest
import torch
from PIL import Image
from tinygrad import Tensor

import tinyclip
from tinyclip import pooling, registry
from tests.conftest import ROOT

REL_TOL = 1e-5          # max |ours - theirs| / max |theirs|
COS_TOL = 1 - 1e-6
DEVICE = "cpu"
IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
TEXTS = ["a photo of a cat", "a photo of a dog", "an astronaut", "", "a cup of coffee on a wooden table",
         "RÉSUMÉ of 3 horses & 2 rockets!! 🚀", "x " * 100]


def features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().numpy()


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    assert ours.dtype == np.float32, f"{what}: dtype {ours.dtype}"
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel <= REL_TOL, f"{what}: relative error {rel:.3g} > {REL_TOL}"
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert cos.min() >= COS_TOL, f"{what}: cosine {cos.min()}"


def oracle(ck, ids, pixels):
    m = ck.torch_model
    with torch.no_grad():
        img = features(m.get_image_features(pixel_values=torch.from_numpy(pixels)))
        txt = features(m.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
        logits = m(input_ids=torch.from_numpy(ids.astype(np.int64)),
                   pixel_values=torch.from_numpy(pixels)).logits_per_image.numpy()
    return img, txt, logits


@pytest.fixture(scope="module")
def pil_images():
    return [Image.open(p) for p in IMAGES]


def test_tiny_configs_match_transformers(tiny, pil_images):
    model = tinyclip.load(tiny.folder, device=DEVICE)
    ids, pixels = model.tokenize(TEXTS), model.preprocess(pil_images)
    img, txt, logits = oracle(tiny, ids, pixels)
    assert_close(model.encode_image(pixels), img, "image embeddings")
    assert_close(model.encode_text(ids), txt, "text embeddings")
    assert_close(model.logits(pixels, ids), logits, "logits")


def test_raw_inputs_equal_preprocessed_inputs(tiny_quick, pil_images):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    np.testing.assert_array_equal(model.encode_text(TEXTS), model.encode_text(model.tokenize(TEXTS)))
    # files go up as uint8 crops normalised on the device (tests/test_host_path.py): float32 rounding apart
    raw, pixels = model.encode_image(IMAGES[:2]), model.encode_image(model.preprocess(pil_images[:2]))
    assert np.abs(raw - pixels).max() <= REL_TOL * np.abs(pixels).max()


def test_batching_does_not_change_results(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    ids = model.tokenize(TEXTS)
    whole = model.encode_text(ids, batch_size=len(TEXTS))
    # batches of 3 run shorter texts (their own longest), so kernels may sum in another order:
    # float32 rounding, FAST_REL_TOL of the largest value
    assert np.abs(model.encode_text(ids, batch_size=3) - whole).max() <= FAST_REL_TOL * np.abs(whole).max()


def test_normalize_option_gives_unit_vectors(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    raw, unit = model.encode_text(TEXTS[:3]), model.encode_text(TEXTS[:3], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=-1), 1.0, atol=UNIT_NORM_TOL)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=-1, keepdims=True), atol=UNIT_VALUE_TOL)


def test_pooling_without_eos_follows_transformers(tiny_quick):
    """Ids without eos: transformers pools position 0 (argmax of all-False); so must we."""
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    ids = np.random.default_rng(0).integers(0, 49406, size=(3, 77))
    _, txt, _ = oracle(tiny_quick, ids, np.zeros((1, 3, 30, 30), np.float32))
    assert_close(model.encode_text(ids), txt, "text embeddings without eos")


def test_legacy_eos_token_id_pools_at_argmax(tmp_path):
    """Configs with eos_token_id == 2 pool at argmax(ids), as transformers does for legacy checkpoints."""
    from tests.checkpoints import build_checkpoint, clip_config
    cfg = clip_config(text=(32, 40, 1, 2), vision=(32, 40, 1, 2, 16, 8), proj=8,
                      text_overrides=dict(eos_token_id=2, max_position_embeddings=12))
    ck_model = build_checkpoint(tmp_path, cfg, perturb=0.02)
    model = tinyclip.load(tmp_path, device=DEVICE)
    ids = np.random.default_rng(1).integers(0, 49408, size=(4, 12))
    ids[0, 3] = 49407
    with torch.no_grad():
        txt = features(ck_model.get_text_features(input_ids=torch.from_numpy(ids)))
    assert_close(model.encode_text(ids), txt, "legacy pooling")


def test_model_tree_takes_and_returns_tensors(tiny_quick):
    """Library users can stay on the device: the module tree works on tinygrad Tensors."""
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    ids = model.tokenize(["a photo of a cat"])
    out = model.model.get_text_features(Tensor(ids.astype(np.int32), device=model.backend.device))
    assert isinstance(out, Tensor) and out.shape == (1, 24)
    with model.backend.context():
        full = out.numpy()   # all 77 positions; encode_text runs 8, so sums may round differently
    assert np.abs(full - model.encode_text(ids)).max() <= FAST_REL_TOL * np.abs(full).max()


def test_vit_b32_full_size_matches_transformers(vit_b32, pil_images):
    model = tinyclip.load(vit_b32.folder, device=DEVICE)
    ids, pixels = model.tokenize(TEXTS[:3]), model.preprocess(pil_images[:2])
    img, txt, logits = oracle(vit_b32, ids, pixels)
    ours_img, ours_txt = model.encode_image(pixels), model.encode_text(ids)
    assert_close(ours_img, img, "ViT-B/32 image embeddings")
    assert_close(ours_txt, txt, "ViT-B/32 text embeddings")
    assert_close(model.logits_from_embeddings(ours_img, ours_txt), logits, "ViT-B/32 logits")


FAST_REL_TOL = 1e-6     # bucketed, padded, truncated and JIT runs against the plain full-context path
UNIT_NORM_TOL = 1e-6    # |norm - 1| of a normalised embedding
UNIT_VALUE_TOL = 1e-7   # a normalised embedding's values against numpy's division


@pytest.mark.slow   # compiles both towers, several times: about a minute
@pytest.mark.parametrize("n", [1, 3, 5])
def test_fast_path_equals_plain_path(tiny_quick, pil_images, n):
    """Buckets (padding the batch), text cut to the longest real length, and TinyJit replays
    give the numbers of the plain path: no padding, full context, no JIT."""
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    texts = (TEXTS * 2)[:n]
    ids, pixels = model.tokenize(texts), model.preprocess((pil_images * 2)[:n])
    with model.backend.context():
        plain_txt = model.model.get_text_features(Tensor(ids.astype(np.int32), device="CPU")).numpy()
        plain_img = model.model.get_image_features(Tensor(pixels, device="CPU")).numpy()
    for _ in range(3):    # the TinyJit captures on the first call (runner.new_jit) and replays after
        fast_txt, fast_img = model.encode_text(ids, batch_size=4), model.encode_image(pixels, batch_size=4)
        assert np.abs(fast_txt - plain_txt).max() <= FAST_REL_TOL * np.abs(plain_txt).max()
        assert np.abs(fast_img - plain_img).max() <= FAST_REL_TOL * np.abs(plain_img).max()


def test_text_is_cut_to_the_longest_pooled_position(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False)   # no graphs from other tests
    ids = model.tokenize(["a cat", "a photo of a dog on a sofa"])
    np.testing.assert_array_equal(pooling.positions(ids, model.config.text_config.eos_token_id), [3, 9])
    model.encode_text(ids)
    assert ("text", 2, 10) in model.runner._jits     # 10 positions: a length a text batch runs at
    longer = model.tokenize(["a photo of a dog on a red sofa", "a cat"])
    np.testing.assert_array_equal(pooling.positions(longer, model.config.text_config.eos_token_id), [10, 3])
    model.encode_text(longer)
    assert ("text", 2, 12) in model.runner._jits     # 11 positions, rounded up to the next length: 12


@pytest.mark.parametrize("ids, match", [
    (np.full((1, 5), -1), r"token ids must lie in \[0, 49408\), got values from -1 to -1"),
    (np.full((1, 5), 49408), r"token ids must lie in \[0, 49408\)"),
    (np.zeros((1, 78), np.int64), r"token ids have length 78; this checkpoint takes 1 to 77"),
    (np.zeros((5,), np.int64), r"token ids must be an integer array \(N, T\), got int64 \(5,\)"),
    (np.zeros((1, 5), np.float32), r"token ids must be an integer array \(N, T\), got float32"),
    ([[1, 2, 3]], r"texts must be a string, a list of strings or token ids \(N, T\); got list \(item 0 is list\)"),
    (42, r"texts must be a string, a list of strings or token ids \(N, T\); got int"),
])
def test_bad_token_ids_are_refused(tiny_quick, ids, match):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    with pytest.raises(tinyclip.TokenizerError, match=match):
        model.encode_text(ids)


@pytest.mark.parametrize("pixels, match", [
    (np.zeros((1, 3, 224, 224), np.float32), r"pixel values must have shape \(N, 3, 30, 30\) for this checkpoint, "
                                             r"got \(1, 3, 224, 224\); pass images to preprocess\(\) first"),
    (np.zeros((3, 30, 30), np.float32), r"pixel values must have shape \(N, 3, 30, 30\)"),
    (np.full((1, 3, 30, 30), np.nan, np.float32), r"pixel values contain NaN or infinity"),
])
def test_bad_pixel_values_are_refused(tiny_quick, pixels, match):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    with pytest.raises(tinyclip.ImageError, match=match):
        model.encode_image(pixels)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_is_refused(tiny_quick, batch_size):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer"):
        model.encode_text(["a cat"], batch_size=batch_size)


def test_tensor_inputs_are_accepted(tiny_quick, pil_images):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE)
    ids, pixels = model.tokenize(["a cat", "a dog"]), model.preprocess(pil_images[:2])
    np.testing.assert_array_equal(model.encode_text(Tensor(ids.astype(np.int32), device="CPU")), model.encode_text(ids))
    np.testing.assert_array_equal(model.encode_image(Tensor(pixels, device="CPU")), model.encode_image(pixels))


def plain_text_features(model, ids):
    """get_text_features at the full context, without the runner (no buckets, no JIT, no plan)."""
    with model.backend.context():
        return model.model.get_text_features(Tensor(ids.astype(np.int32), device="CPU")).numpy()


def test_a_batch_pads_into_a_compiled_longer_graph_until_the_padding_has_cost_a_compile(tiny_quick):
    """A batch runs in a longer graph already compiled instead of compiling its own (exact under the causal
    mask, to float32 rounding) until the padding spent in its place exceeds what a compile costs."""
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False)
    model.encode_text(["a photo of a dog on a red sofa", "a dog"])          # 11 positions: runs at 12
    assert set(model.runner._jits) == {("text", 2, 12)}
    ids = model.tokenize(["a photo of a cat", "a cat"])                     # 7 positions: its own length is 8
    padding = 2 * 12 - 2 * 8                                                # tokens a call pads
    model.runner.planner.text_cost = 2 * padding
    plain = plain_text_features(model, ids)
    for _ in range(2):
        reused = model.encode_text(ids)
        assert set(model.runner._jits) == {("text", 2, 12)}, "7 positions ran on the 12-position graph"
        assert np.abs(reused - plain).max() <= FAST_REL_TOL * np.abs(plain).max()
    model.encode_text(ids)                                                  # a third call's padding is more
    assert ("text", 2, 8) in model.runner._jits


def test_a_query_compiles_the_full_context_and_later_queries_of_any_length_run_in_it(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False)
    context = model.config.text_config.max_position_embeddings
    for text in ("a cat", "a photo of a dog on a red sofa", "x"):
        ids = model.tokenize([text])
        ours = model.encode_text(ids)
        assert set(model.runner._jits) == {("text", 1, context)}, text
        plain = plain_text_features(model, ids)
        assert np.abs(ours - plain).max() <= FAST_REL_TOL * np.abs(plain).max(), text


@pytest.mark.parametrize("compile_tokens, graphs", [
    (None, {("text", 2, 12)}),                                     # the later batches pad into the first's graph
    (0, {("text", 2, 12), ("text", 2, 8), ("text", 1, 4)}),        # compiling costs nothing: each its own
])
def test_a_text_job_runs_longest_first_and_keeps_the_order_of_its_texts(tiny_quick, compile_tokens,
                                                                         graphs):
    """Rows are sorted by length into batches (positions needed: 11, 11 | 7, 4 | 3) and put back in order."""
    model = tinyclip.load(tiny_quick.folder, device=DEVICE, graph_cache=False)
    if compile_tokens is not None:
        model.runner.planner.text_cost = compile_tokens
    texts = ["a cat", "a photo of a dog on a red sofa", "x", "a photo of a cat", "a dog on a very old and red sofa"]
    ids = model.tokenize(texts)
    ours = model.encode_text(ids, batch_size=2)
    assert set(model.runner._jits) == graphs
    plain = plain_text_features(model, ids)
    for i, text in enumerate(texts):
        assert np.abs(ours[i] - plain[i]).max() <= FAST_REL_TOL * np.abs(plain[i]).max(), text


@pytest.mark.parametrize("eos", [pooling.LEGACY_EOS, 49407, 7])
def test_the_pooling_rule_is_the_same_on_the_host_and_in_the_graph(eos):
    """pooling.positions (numpy, the runner's) and pooling.one_hot (tinygrad, the model's) pick the same
    token: ties at the largest id, rows without eos, eos at position 0 and last."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 12, (64, 9)).astype(np.int32)
    ids[:8, -1], ids[8:16, 0], ids[16:20] = eos, eos, 3       # eos last, eos first, a constant row
    with registry.select(DEVICE).context():
        hot = pooling.one_hot(Tensor(ids, device="CPU"), eos).numpy()
    assert (hot.sum(-1) == 1).all()
    np.testing.assert_array_equal(hot.argmax(-1), pooling.positions(ids, eos))
