"""The image host path: uint8 crops uploaded and normalised on the device, staging arrays reused
without a padding copy, the next batch prepared while the device encodes this one.

The oracles: transformers' CLIPImageProcessorPil and CLIPModel (embeddings), tinyclip's own
preprocess() (itself tested against transformers and open_clip in test_preprocess.py and
test_openclip.py) for the pixel values the device makes.
"""
import json
import pathlib
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tinygrad import Tensor

import tinyclip
from tinyclip import _tinygrad, registry
from tinyclip.errors import ImageError
from tinyclip.pixels import pixel_values
from tinyclip.checkpoints.open_clip import OpenClipImageProcessor
from tinyclip.preprocess import ImageProcessor, PixelScaling
from tests.conftest import ROOT
from tests.test_preprocess import CONFIGS

PIXEL_TOL = 1e-5        # device pixel values against preprocess()'s, absolute (values are O(1))
REL_TOL = {"float32": 1e-5, "float16": 1e-2}          # embeddings against transformers, as test_backends.py
COS_TOL = {"float32": 1 - 1e-6, "float16": 0.9999}
FAST_REL_TOL = 1e-6     # the same images in other batches and buckets (test_parity.py's bound)
PREFETCH_WAIT_S = 30    # how long a batch's run waits to see the next batch being prepared
BACKENDS = ("cpu", "cpu-llvm", "opencl")
PHOTOS = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))


def backend(name: str) -> registry.Backend:
    b = next(b for b in registry.registered() if b.name == name)
    if not b.available:
        pytest.skip(f"{name} is not available here: {b.unavailable}")
    return b


def device_pixels(processor, images, b: registry.Backend) -> np.ndarray:
    """The pixel values the encoder graph makes: the processor's uint8 crops, uploaded, scaled on the device."""
    crops = np.stack([processor.crop(image, i) for i, image in enumerate(images)])
    with b.context():
        return pixel_values(Tensor(crops, device=b.device), processor.scaling()).numpy()


def oracle_features(ck, images) -> np.ndarray:
    """transformers' image features of transformers' pixel values of the same inputs (paths, PIL images
    or arrays: a path's alpha is dropped, a PIL image's composited onto white, in both libraries)."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    proc = transformers.CLIPImageProcessorPil.from_pretrained(ck.folder)
    images = [str(i) if isinstance(i, pathlib.Path) else i for i in images]
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ck.torch_model.get_image_features(pixel_values=pixels)
    return getattr(out, "pooler_output", out).numpy()


def assert_close(ours, theirs, dtype, what):
    assert ours.dtype == np.float32 and ours.shape == theirs.shape, what
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert rel <= REL_TOL[dtype], f"{what}: relative error {rel:.3g} > {REL_TOL[dtype]}"
    assert cos.min() >= COS_TOL[dtype], f"{what}: cosine {cos.min()}"


def float_graphs_only(model) -> bool:
    """Whether every image graph the model ran takes float32 pixel values (its bucket may be one the
    graph cache already had: batch_plan.py pads into a compiled graph)."""
    keys = [k for k in model.runner._jits if k[0] == "image"]
    return bool(keys) and all(len(k) == 2 for k in keys)


def with_preprocessor(ck, tmp_path, **settings):
    """A copy of a checkpoint folder whose preprocessor_config.json has `settings` changed."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(ck.folder, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**config, **settings}))
    return folder


# ---- pixel values made on the device ------------------------------------------------------------

SPLIT_CONFIGS = {name: c for name, c in CONFIGS.items() if not c.get("do_pad")}
SPLIT_CONFIGS["no-rescale-normalize"] = {"do_rescale": False, "image_mean": [100.0, 120.0, 90.0],
                                         "image_std": [60.0, 50.0, 70.0]}
SPLIT_CONFIGS["rescale-only-odd-factor"] = {"do_normalize": False, "rescale_factor": 0.0123}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("config", sorted(SPLIT_CONFIGS))
def test_device_pixels_equal_preprocess(config, name):
    processor = ImageProcessor.from_dict(SPLIT_CONFIGS[config])
    b = backend(name)
    # a fixed crop size takes a batch; otherwise each image is its own batch
    groups = [PHOTOS] if processor.crop_shape() is not None else [[p] for p in PHOTOS]
    for images in groups:
        ours = device_pixels(processor, images, b)
        np.testing.assert_allclose(ours, processor(images), rtol=0, atol=PIXEL_TOL, err_msg=f"{config} on {name}")


OPENCLIP_SETTINGS = [dict(size=40), dict(size=33, resize_mode="longest", fill_color=128, interpolation="bilinear",
                                         mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]), dict(size=24, resize_mode="squash")]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("settings", OPENCLIP_SETTINGS, ids=lambda s: s.get("resize_mode", "shortest"))
def test_open_clip_device_pixels_equal_preprocess(settings, name):
    processor = OpenClipImageProcessor(**settings)
    ours = device_pixels(processor, PHOTOS, backend(name))
    np.testing.assert_allclose(ours, processor(PHOTOS), rtol=0, atol=PIXEL_TOL)


def test_crops_are_the_uint8_steps_of_preprocess():
    """crop() is preprocess() up to the float steps: with those off, the same numbers."""
    raw = ImageProcessor(do_rescale=False, do_normalize=False)
    for i, path in enumerate(PHOTOS):
        np.testing.assert_array_equal(raw.crop(path, i).transpose(2, 0, 1), raw(path)[0])
        assert raw.crop(path, i).dtype == np.uint8


def test_pixel_scalings_have_distinct_stable_keys():
    a = ImageProcessor().scaling()
    assert a.key() == ImageProcessor().scaling().key()
    others = [ImageProcessor(image_mean=[0.5, 0.5, 0.5]).scaling(), ImageProcessor(image_std=0.3).scaling(),
              ImageProcessor(rescale_factor=1 / 256).scaling(), ImageProcessor(do_normalize=False).scaling(),
              ImageProcessor(do_rescale=False).scaling(), OpenClipImageProcessor(std=0.25).scaling()]
    assert len({a.key(), *(o.key() for o in others)}) == 1 + len(others)
    assert OpenClipImageProcessor().scaling().key() == a.key(), "the same steps share their graphs"


def test_a_processor_that_pads_after_normalising_has_no_device_steps():
    assert ImageProcessor(do_pad=True, pad_size=240).scaling() is None
    assert PixelScaling() == ImageProcessor(do_rescale=False, do_normalize=False).scaling()


# ---- encode_image through the uint8 path ---------------------------------------------------------

def test_image_files_equal_transformers_through_uint8_crops(tiny):
    model = tinyclip.load(tiny.folder, device="cpu")
    assert_close(model.encode_image(PHOTOS, batch_size=4), oracle_features(tiny, PHOTOS), "float32", "paths")
    assert all(len(key) == 3 and key[2].startswith("uint8-") for key in model.runner._jits if key[0] == "image")


@pytest.mark.slow   # a model and its graphs per backend and dtype: up to 20 s each
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_input_kind_equals_transformers_on_each_backend(tiny_quick, name, dtype):
    """Paths, PIL images and HWC uint8 arrays, float32 and float16 (pixels normalised in float32 and
    cast by the model, as preprocessed pixels are): transformers' features within the backend bounds."""
    b = backend(name)
    if dtype not in b.usable_dtypes:
        pytest.skip(f"{name} does not run {dtype} here")
    model = tinyclip.load(tiny_quick.folder, device=name, dtype=dtype)
    pil = [Image.open(p) for p in PHOTOS]
    for what, images in [("paths", PHOTOS), ("PIL images", pil),
                         ("uint8 arrays", [np.asarray(i.convert("RGB")) for i in pil])]:
        assert_close(model.encode_image(images, batch_size=4), oracle_features(tiny_quick, images), dtype,
                     f"{what} on {name} in {dtype}")
    assert_close(model.encode_image(model.preprocess(PHOTOS)), oracle_features(tiny_quick, PHOTOS), dtype,
                 "pixel values")


def test_preprocessed_pixels_still_run_the_float_graph(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    pixels = model.preprocess(PHOTOS[:3])
    out = model.encode_image(pixels)
    assert float_graphs_only(model)
    assert_close(out, oracle_features(tiny_quick, PHOTOS[:3]), "float32", "pixel values")


def test_a_padding_processor_falls_back_to_preprocess(tiny_quick, tmp_path):
    v = tiny_quick.config.vision_config
    folder = with_preprocessor(tiny_quick, tmp_path, crop_size=v.image_size - 4, do_pad=True, pad_size=v.image_size)
    model = tinyclip.load(folder, device="cpu")
    np.testing.assert_array_equal(model.encode_image(PHOTOS[:3]), model.encode_image(model.preprocess(PHOTOS[:3])))
    assert float_graphs_only(model)


def test_crops_of_varying_size_fall_back_to_preprocess_and_its_errors(tiny_quick, tmp_path):
    v = tiny_quick.config.vision_config
    folder = with_preprocessor(tiny_quick, tmp_path, do_center_crop=False, size={"shortest_edge": v.image_size})
    model = tinyclip.load(folder, device="cpu")
    square = [np.full((50, 50, 3), 40 * i, np.uint8) for i in range(3)]
    np.testing.assert_array_equal(model.encode_image(square), model.encode_image(model.preprocess(square)))
    assert float_graphs_only(model)
    with pytest.raises(ImageError, match="images differ in size after preprocessing"):
        model.encode_image(square + [np.zeros((50, 80, 3), np.uint8)])


def test_uint8_graphs_are_saved_and_loaded_under_their_own_key(tiny_quick, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCLIP_CACHE_DIR", str(tmp_path))
    first = tinyclip.load(tiny_quick.folder, device="cpu")
    key = first.runner.image_key(4, first.image_scaling())
    want = first.encode_image(PHOTOS[:3])
    names = sorted(p.name for p in (tmp_path / "graphs").glob("image-*.graph"))
    assert len(names) == 1 and names[0].startswith(f"image-4-{key[2]}-"), names
    later = tinyclip.load(tiny_quick.folder, device="cpu")
    assert later.runner.compiled(key) and not later.runner.compiled(("image", 4))
    np.testing.assert_array_equal(later.encode_image(PHOTOS[:3]), want)
    assert getattr(later.runner._jits[key], "graph_header", None) is not None, "captured again, not loaded"


# ---- staging: no padding copy, rows past a batch left as they are --------------------------------

def test_rows_past_a_batch_keep_earlier_images_and_change_nothing(tiny_quick):
    """Batches of 4, 4 and 3: the third reuses the first's staging array, whose last row still holds
    image 3 when image 8's batch runs; each embedding equals that image's alone."""
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    images = [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS] * 2
    images = images[:11]
    n, fill, scaling = model._crops(images)
    seen = []

    def recording_fill(rows, start, stop):
        fill(rows, start, stop)
        seen.append((start, rows.copy()))
    together = model.runner.images(n, 4, recording_fill, scaling)
    starts = [start for start, _ in seen]
    assert starts == [0, 4, 8]
    np.testing.assert_array_equal(seen[2][1][3], seen[0][1][3])    # left as image 3's crop, not cleared
    alone = np.concatenate([model.encode_image(images[i:i + 1], batch_size=1) for i in range(n)])
    assert np.abs(together - alone).max() <= FAST_REL_TOL * np.abs(alone).max()


def test_float_pixel_batches_equal_one_batch(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    pixels = model.preprocess(PHOTOS * 2)
    whole = model.encode_image(pixels, batch_size=len(pixels))
    assert np.abs(model.encode_image(pixels, batch_size=5) - whole).max() <= FAST_REL_TOL * np.abs(whole).max()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_staging_uploads_what_was_written_each_time(name, dtype):
    b = backend(name)
    with b.context():
        staging = _tinygrad.Staging((3, 5, 4, 3), dtype, b.device)
        assert staging.kind == ("device buffer" if b.device.startswith("CPU") else "copied")
        assert not staging.array.any(), "a new staging array reads as zeros"
        rng = np.random.default_rng(0)
        for _ in range(2):
            staging.array[:] = rng.integers(0, 256, staging.shape).astype(dtype)
            t = staging.upload()
            assert t is staging.tensor and t.dtype == _tinygrad.NUMPY_DTYPES[np.dtype(dtype)]
            np.testing.assert_array_equal((t + 0).numpy(), staging.array)


def test_cuda_staging_is_page_locked_and_uploads_exactly():
    """Runs where CUDA is (benchmarks/gpu/check.sh runs `pytest -k cuda`); skipped elsewhere."""
    b = backend("cuda")
    with b.context():
        for dtype in (np.uint8, np.float32):
            staging = _tinygrad.Staging((4, 8, 8, 3), dtype, b.device)
            assert staging.kind == "page-locked" and not staging.array.any()
            for value in (7, 9):
                staging.array[:] = (np.arange(staging.array.size) % 251 * value).reshape(staging.shape).astype(dtype)
                np.testing.assert_array_equal((staging.upload() + 0).numpy(), staging.array)


def test_cuda_images_equal_transformers_through_page_locked_crops(tiny_quick):
    backend("cuda")
    model = tinyclip.load(tiny_quick.folder, device="cuda")
    assert_close(model.encode_image(PHOTOS * 2, batch_size=4), oracle_features(tiny_quick, PHOTOS * 2), "float32",
                 "paths on cuda")


# ---- the next batch prepared while the device encodes this one -----------------------------------

def test_the_next_batch_is_prepared_while_this_one_runs(tiny_quick):
    """Each batch's run waits (a bounded time) until the next batch's preparation has begun: with a
    host path that prepares batches one after the other, that never happens and the test fails."""
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    n, fill, scaling = model._crops(PHOTOS * 2)
    started = {}     # batch start -> (thread, event)

    def recording_fill(rows, start, stop):
        started.setdefault(start, threading.Event()).set()
        fill(rows, start, stop)
    run, overlapped = model.runner._run, []

    def watched_run(key, x):
        following = len(overlapped) * 4 + 4          # the start of the batch after this one
        if following < n:
            overlapped.append(started.setdefault(following, threading.Event()).wait(PREFETCH_WAIT_S))
        return run(key, x)
    model.runner._run = watched_run
    ours = model.runner.images(n, 4, recording_fill, scaling)
    assert overlapped == [True, True]
    del model.runner._run
    np.testing.assert_array_equal(ours, model.encode_image(PHOTOS * 2, batch_size=4))


def test_a_bad_file_in_a_later_batch_raises_what_preprocess_raises(tiny_quick, tmp_path):
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    missing = tmp_path / "missing.jpg"
    for images in ([*PHOTOS, bad, *PHOTOS], [*PHOTOS[:5], missing, PHOTOS[0], bad],
                   [PHOTOS[0], bad, missing, *PHOTOS]):
        with pytest.raises(ImageError) as expected:
            model.preprocess(images)
        with pytest.raises(ImageError) as ours:
            model.encode_image(images, batch_size=2)
        assert str(ours.value) == str(expected.value)


@pytest.mark.parametrize("pad", [False, True], ids=["crops", "padding processor"])
def test_embedding_files_equals_encoding_them(tiny_quick, tmp_path, pad):
    """tasks.embed_image_files (embed, search) reads the next batch in a thread and uploads crops, or
    preprocessed pixels where the processor cannot split: the numbers of encode_image on the paths."""
    from tinyclip import tasks
    v = tiny_quick.config.vision_config
    folder = with_preprocessor(tiny_quick, tmp_path, **(dict(crop_size=v.image_size - 4, do_pad=True,
                                                              pad_size=v.image_size) if pad else {}))
    model = tinyclip.load(folder, device="cpu")
    paths = [str(p) for p in PHOTOS] * 2
    batches = list(tasks.embed_image_files(model, paths, batch_size=4))
    assert [p for batch, _ in batches for p in batch] == paths
    np.testing.assert_array_equal(np.concatenate([e for _, e in batches]), model.encode_image(paths, batch_size=4))
    assert (model.image_scaling() is None) == pad


def test_order_is_kept_across_many_batches(tiny_quick):
    model = tinyclip.load(tiny_quick.folder, device="cpu")
    images = [Image.open(p) for p in PHOTOS] * 3
    many = model.encode_image(images, batch_size=2)
    assert_close(many, oracle_features(tiny_quick, images), "float32", "batches of 2")
    whole = model.encode_image(images, batch_size=len(images))
    assert np.abs(many - whole).max() <= FAST_REL_TOL * np.abs(whole).max()
    model.runner.prefetch = False     # every batch prepared in turn, in this thread: the same numbers
    np.testing.assert_array_equal(model.encode_image(images, batch_size=2), many)
