"""tinyclip.preprocess against transformers' CLIPImageProcessor, the oracle.

Without torchvision, transformers 5 resolves CLIPImageProcessor to
CLIPImageProcessorPil; the tests name that class so that installing torchvision
later cannot switch the oracle to the torchvision backend, which resizes
differently. Everything runs offline on the photographs in tests/data/images and
on small synthetic images.
"""
import io
import json
import pathlib
import re
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tinyclip.errors import ConfigError, ImageError
from tinyclip.preprocess import ImageProcessor, load_image

PIXEL_ATOL = 1e-5   # largest absolute difference allowed from transformers' pixel values

IMAGES = pathlib.Path(__file__).resolve().parent / "data" / "images"
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg"]

OPENAI_CONFIG = {   # openai/clip-vit-base-patch32's preprocessor_config.json
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
CONFIGS = {
    "openai": OPENAI_CONFIG,
    "336": {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    "legacy-ints": {"size": 224, "crop_size": 224, "feature_extractor_type": "CLIPFeatureExtractor"},
    "height-width-bilinear-no-crop": {"size": {"height": 160, "width": 240}, "resample": 2, "do_center_crop": False},
    "lanczos-other-stats-rect-crop": {"resample": 1, "image_mean": [0.5, 0.4, 0.3], "image_std": 0.5,
                                      "crop_size": {"height": 200, "width": 180}},
    "no-normalize-nearest": {"do_normalize": False, "resample": 0, "size": {"shortest_edge": 256}},
    "shortest-longest-edge": {"size": {"shortest_edge": 200, "longest_edge": 260}, "crop_size": 150},
    "max-height-width-no-crop": {"size": {"max_height": 120, "max_width": 100}, "do_center_crop": False},
    "crop-then-pad": {"crop_size": {"height": 200, "width": 190}, "do_pad": True, "pad_size": 230},
    "raw-uint8": {"do_rescale": False, "do_normalize": False, "resample": 4},
}


@pytest.fixture(scope="module")
def oracle_class():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()   # silence the "falling back to the PIL backend" notice
    return transformers.CLIPImageProcessorPil


def oracle(oracle_class, config, images):
    return oracle_class(**config)(images, return_tensors="np")["pixel_values"]


def assert_matches_oracle(oracle_class, config, images):
    expected = oracle(oracle_class, config, images)
    ours = ImageProcessor.from_dict(config)(images)
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected.astype(np.float32), rtol=0, atol=PIXEL_ATOL)
    return ours


def synthetic(mode, width=37, height=29):
    """A deterministic random image in PIL mode `mode` (plus "<mode>+transparency" variants)."""
    rng = np.random.default_rng(zlib.crc32(mode.encode()))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    rgb = rgba.convert("RGB")
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) > 0.5)
    if mode in ("I;16", "I;16B"):   # values past 255 too: Pillow clips them when converting to RGB
        values = rng.integers(0, 600, (height, width)).astype("<u2" if mode == "I;16" else ">u2")
        return Image.frombytes(mode, (width, height), values.tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-300, 600, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((height, width)) * 450 - 50).astype(np.float32))
    if mode in ("RGBa", "La"):   # premultiplied alpha, built from raw bytes
        raw = rgba if mode == "RGBa" else rgba.convert("LA")
        return Image.frombytes(mode, raw.size, raw.tobytes())
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if mode == "P+transparency":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "L+transparency":
        image = rgb.convert("L")
        image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "RGB+transparency":
        rgb.info["transparency"] = tuple(int(v) for v in np.asarray(rgb)[1, 2])
        return rgb
    if mode in ("LA", "PA", "RGBA"):
        return rgba.convert(mode)
    return rgb.convert(mode)


# ---- parity on photographs -------------------------------------------------------------------------

@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("photo", PHOTOS)
def test_photograph_matches_transformers(oracle_class, photo, config_name):
    with Image.open(IMAGES / photo) as image:
        assert_matches_oracle(oracle_class, CONFIGS[config_name], image)


def test_a_batch_of_photographs_matches_transformers_in_order(oracle_class):
    images = [Image.open(IMAGES / photo) for photo in PHOTOS]
    ours = assert_matches_oracle(oracle_class, OPENAI_CONFIG, images)
    assert ours.shape == (len(PHOTOS), 3, 224, 224)


def test_oracle_is_the_pil_backend_when_torchvision_is_absent(oracle_class):
    transformers = pytest.importorskip("transformers")
    if transformers.utils.is_torchvision_available():
        pytest.skip("torchvision is installed: CLIPImageProcessor is the torchvision backend")
    assert type(transformers.CLIPImageProcessor()) is oracle_class


# ---- PIL modes -------------------------------------------------------------------------------------

MODES = ["1", "L", "L+transparency", "LA", "P", "P+transparency", "PA", "RGB", "RGB+transparency", "RGBA", "RGBa",
         "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I;16", "I;16B", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_matches_transformers(oracle_class, mode):
    # a crop larger than the resized image keeps every converted pixel (and some padding) in view
    config = {"size": {"shortest_edge": 40}, "crop_size": {"height": 48, "width": 44}}
    assert_matches_oracle(oracle_class, config, synthetic(mode))


def test_transparency_is_composited_onto_white():
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))   # fully transparent black
    raw = ImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)(clear)
    assert (raw == 255).all()


def test_mode_transformers_cannot_convert_raises_image_error(oracle_class):
    image = synthetic("La")
    with pytest.raises(ValueError):   # Pillow cannot convert La to RGB in transformers either
        oracle(oracle_class, {}, image)
    with pytest.raises(ImageError, match=r"image 0 \(PIL mode La, 37x29\).*RGB"):
        ImageProcessor()(image)


@pytest.mark.parametrize("mode", ["RGB", "YCbCr"])
def test_without_rgb_conversion_three_band_modes_pass_through_like_transformers(oracle_class, mode):
    assert_matches_oracle(oracle_class, {"do_convert_rgb": False}, synthetic(mode))


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_without_rgb_conversion_other_modes_are_rejected(mode):
    with pytest.raises(ImageError, match=f"image 0 has PIL mode {mode} and do_convert_rgb is false"):
        ImageProcessor(do_convert_rgb=False)(synthetic(mode))


# ---- sizes, rounding and padding -------------------------------------------------------------------

ODD_SIZES = [(1, 1), (3, 500), (500, 3), (225, 224), (224, 225), (7, 9), (299, 300)]


@pytest.mark.parametrize("width,height", ODD_SIZES)
def test_odd_aspect_ratios_match_transformers(oracle_class, width, height):
    assert_matches_oracle(oracle_class, OPENAI_CONFIG, synthetic("RGB", width, height))


@pytest.mark.parametrize("width,height", [(7, 9), (100, 300), (300, 100), (223, 224)])
def test_image_smaller_than_the_crop_is_zero_padded_like_transformers(oracle_class, width, height):
    config = {"do_resize": False}
    ours = assert_matches_oracle(oracle_class, config, synthetic("RGB", width, height))
    # padding is 0 before normalization, so (0 - mean) / std after it
    padding = -np.array(OPENAI_CONFIG["image_mean"], np.float32) / np.array(OPENAI_CONFIG["image_std"], np.float32)
    np.testing.assert_allclose(ours[0, :, 0, 0], padding, atol=PIXEL_ATOL)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 48), height=st.integers(1, 48), edge=st.integers(1, 40), crop=st.integers(1, 40),
       kind=st.sampled_from(["shortest_edge", "height_width", "shortest_longest", "max_height_width", "int"]),
       resample=st.integers(0, 5))
def test_resize_and_crop_arithmetic_matches_transformers(oracle_class, width, height, edge, crop, kind, resample):
    size = {"shortest_edge": {"shortest_edge": edge}, "height_width": {"height": edge, "width": crop},
            "shortest_longest": {"shortest_edge": edge, "longest_edge": edge + crop},
            "max_height_width": {"max_height": edge, "max_width": crop}, "int": edge}[kind]
    config = {"size": size, "crop_size": {"height": crop, "width": edge}, "resample": resample}
    image = synthetic("RGB", width, height)
    try:
        expected = oracle(oracle_class, config, image)
    except ValueError:   # the size rounds to 0 pixels: Pillow refuses, and so must we
        with pytest.raises(ImageError, match="would be resized to"):
            ImageProcessor.from_dict(config)(image)
        return
    np.testing.assert_allclose(ImageProcessor.from_dict(config)(image), expected, rtol=0, atol=PIXEL_ATOL)


@pytest.mark.parametrize("config", [{"size": 100, "default_to_square": True}, {"use_square_size": True},
                                    {"size": [120, 90], "do_center_crop": False}],
                         ids=["default_to_square", "use_square_size", "size-pair"])
def test_legacy_size_spellings_match_transformers(oracle_class, config):
    assert_matches_oracle(oracle_class, config, synthetic("RGB", 150, 110))


# ---- inputs: numpy arrays, paths, batches ----------------------------------------------------------

def test_hwc_uint8_array_equals_the_pil_image():
    with Image.open(IMAGES / "chelsea.png") as image:
        proc = ImageProcessor()
        np.testing.assert_array_equal(proc(np.asarray(image)), proc(image))


def test_chw_uint8_array_equals_the_pil_image():
    with Image.open(IMAGES / "coffee.png") as image:
        proc = ImageProcessor()
        np.testing.assert_array_equal(proc(np.asarray(image).transpose(2, 0, 1)), proc(image))


def test_grayscale_arrays_equal_the_mode_l_image(oracle_class):
    with Image.open(IMAGES / "camera.png") as image:
        gray = np.asarray(image)
        ours = ImageProcessor()(gray)   # (H, W): transformers rejects 2-D arrays, tinyclip reads them as (H, W, 1)
        np.testing.assert_array_equal(ours, ImageProcessor()(image))
        np.testing.assert_allclose(ours, oracle(oracle_class, {}, gray[:, :, None]), rtol=0, atol=PIXEL_ATOL)


@pytest.mark.parametrize("shape", [(20, 30, 4), (4, 20, 30), (20, 30, 1), (3, 9, 3), (1, 9, 4)],
                         ids=["HWC-rgba", "CHW-rgba", "HW1", "ambiguous-3xWx3", "ambiguous-1xWx4"])
def test_arrays_match_transformers_including_its_channel_axis_guess(oracle_class, shape):
    # RGBA arrays are blended onto white in float64, unlike PIL images; an array whose first axis
    # could be channels is read channels-first even if its last axis could be too.
    array = np.random.default_rng(len(shape) * sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert_matches_oracle(oracle_class, {"size": {"shortest_edge": 32}, "crop_size": 32}, array)


def test_a_4d_array_is_a_batch(oracle_class):
    batch = np.random.default_rng(1).integers(0, 256, (3, 30, 20, 3), dtype=np.uint8)
    ours = assert_matches_oracle(oracle_class, {}, batch)
    np.testing.assert_array_equal(ours[2], ImageProcessor()(batch[2])[0])


@pytest.mark.parametrize("photo", PHOTOS)
def test_str_and_pathlib_paths_equal_the_pil_image_and_transformers(oracle_class, photo):
    path = IMAGES / photo
    proc = ImageProcessor()
    from_path = proc(str(path))
    np.testing.assert_array_equal(proc(path), from_path)
    with Image.open(path) as image:
        np.testing.assert_array_equal(proc(image), from_path)
    np.testing.assert_allclose(from_path, oracle(oracle_class, {}, str(path)), rtol=0, atol=PIXEL_ATOL)


def test_a_path_drops_alpha_like_transformers_load_image(oracle_class, tmp_path):
    # transformers' load_image converts files to RGB (alpha dropped); only PIL objects are composited.
    path = tmp_path / "clear.png"
    synthetic("RGBA").save(path)
    config = {"size": {"shortest_edge": 32}, "crop_size": 32}
    ours = ImageProcessor.from_dict(config)(str(path))
    np.testing.assert_allclose(ours, oracle(oracle_class, config, str(path)), rtol=0, atol=PIXEL_ATOL)
    with Image.open(path) as image:
        assert not np.allclose(ours, ImageProcessor.from_dict(config)(image))


def test_a_path_is_turned_upright_by_its_exif_orientation_like_transformers(oracle_class, tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6   # "rotate 90° clockwise to view"
    synthetic("RGB", 60, 40).save(path, exif=exif)
    assert load_image(path).size == (40, 60)
    config = {"size": {"shortest_edge": 32}, "do_center_crop": False}
    ours = ImageProcessor.from_dict(config)(path)
    assert ours.shape == (1, 3, 48, 32)
    np.testing.assert_allclose(ours, oracle(oracle_class, config, str(path)), rtol=0, atol=PIXEL_ATOL)


def test_load_image_returns_a_decoded_rgb_image():
    image = load_image(IMAGES / "horse.png")
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (400, 328)


def test_a_single_image_gives_a_batch_of_one_and_lists_keep_order():
    a, b = synthetic("RGB", 50, 40), synthetic("L", 30, 60)
    proc = ImageProcessor()
    assert proc(a).shape == (1, 3, 224, 224)
    both = proc((a, b))
    np.testing.assert_array_equal(both[0], proc(a)[0])
    np.testing.assert_array_equal(both[1], proc([b])[0])


def test_output_is_float32_even_without_rescale_and_normalize(oracle_class):
    config = {"do_rescale": False, "do_normalize": False}
    assert oracle(oracle_class, config, synthetic("RGB")).dtype == np.uint8   # transformers keeps uint8
    ours = assert_matches_oracle(oracle_class, config, synthetic("RGB"))
    assert ours.dtype == np.float32


# ---- configuration ---------------------------------------------------------------------------------

def test_from_pretrained_reads_preprocessor_config_json(oracle_class, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CONFIGS["336"]))
    image = synthetic("RGB", 400, 350)
    np.testing.assert_allclose(ImageProcessor.from_pretrained(tmp_path)(image),
                               oracle(oracle_class, CONFIGS["336"], image), rtol=0, atol=PIXEL_ATOL)
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json").crop_size == \
        {"height": 336, "width": 336}


def test_from_pretrained_prefers_the_image_processor_in_processor_config_json(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 100}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"crop_size": 64}}))
    assert ImageProcessor.from_pretrained(tmp_path)(synthetic("RGB")).shape == (1, 3, 64, 64)


def test_from_pretrained_without_a_config_uses_clip_defaults_at_image_size(oracle_class, tmp_path):
    image = synthetic("RGB", 90, 70)
    expected = oracle(oracle_class, {"size": {"shortest_edge": 64}, "crop_size": 64}, image)
    np.testing.assert_allclose(ImageProcessor.from_pretrained(tmp_path, image_size=64)(image), expected,
                               rtol=0, atol=PIXEL_ATOL)
    assert ImageProcessor.from_pretrained(tmp_path).to_dict() == ImageProcessor.from_dict(OPENAI_CONFIG).to_dict()


def test_defaults_equal_clip_image_processor_defaults(oracle_class):
    np.testing.assert_allclose(ImageProcessor()(synthetic("RGB", 300, 260)),
                               oracle(oracle_class, {}, synthetic("RGB", 300, 260)), rtol=0, atol=PIXEL_ATOL)


def test_null_flags_turn_steps_off_like_transformers(oracle_class):
    config = {"do_center_crop": None, "do_normalize": None}
    assert_matches_oracle(oracle_class, config, synthetic("RGB", 60, 50))


def test_null_setting_for_an_enabled_step_is_a_config_error(oracle_class):
    with pytest.raises(ValueError):
        oracle(oracle_class, {"resample": None}, synthetic("RGB"))
    with pytest.raises(ConfigError, match="key 'resample' is null but do_resize is true"):
        ImageProcessor.from_dict({"resample": None})


# ---- errors ----------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(ImageError, match=f"image 1: {path}: image file not found"):
        ImageProcessor()([synthetic("RGB"), path])


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: the file is empty \(0 bytes\)"):
        load_image(path)


def test_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("shopping list: milk, eggs")
    with pytest.raises(ImageError, match="notes.jpg: not an image Pillow can read"):
        ImageProcessor()(str(path))


@pytest.mark.parametrize("photo", ["astronaut.png", "rocket.jpg"])
def test_truncated_file(tmp_path, photo):
    data = (IMAGES / photo).read_bytes()
    path = tmp_path / photo
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"{photo}: the image is truncated or corrupt"):
        load_image(path)


def test_truncated_image_passed_as_a_lazy_pil_object():
    data = (IMAGES / "rocket.jpg").read_bytes()
    image = Image.open(io.BytesIO(data[: len(data) // 2]))   # opens: only the header is read
    with pytest.raises(ImageError, match=r"image 0 \(PIL mode RGB, 640x427\) cannot be decoded"):
        ImageProcessor()(image)


def test_directory_and_url_are_not_images(tmp_path):
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="does not download images"):
        load_image("https://example.com/cat.jpg")


@pytest.mark.parametrize("shape", [(5, 6, 2), (2, 3, 5, 7, 1), (7,)])
def test_array_of_bad_shape(shape):
    with pytest.raises(ImageError, match=rf"image 0 is an array of shape {re_tuple(shape)}"):
        ImageProcessor()(np.zeros(shape, np.uint8))


def test_array_of_float_dtype_is_rejected():
    # transformers would treat a [0, 1] float image as rescaled during the resize and rescale it again
    with pytest.raises(ImageError, match=r"image 0 is an array of dtype float32 and shape \(8, 8, 3\).*uint8"):
        ImageProcessor()(np.full((8, 8, 3), 0.5, np.float32))


def test_array_with_wrong_channels_when_not_converting():
    with pytest.raises(ImageError, match=r"shape \(8, 8, 4\) with 4 channel\(s\) and do_convert_rgb is false"):
        ImageProcessor(do_convert_rgb=False)(np.zeros((8, 8, 4), np.uint8))


def test_empty_image():
    with pytest.raises(ImageError, match="image 0 is empty: 0x5 pixels"):
        ImageProcessor()(np.zeros((5, 0, 3), np.uint8))


def test_unsupported_input_type_names_type_and_index():
    with pytest.raises(ImageError, match="image 1 has unsupported type int"):
        ImageProcessor()([synthetic("RGB"), 42])
    with pytest.raises(ImageError, match="load_image takes a file path or a PIL image, got bytes"):
        load_image(b"\x89PNG")


def test_empty_batch():
    with pytest.raises(ImageError, match="no images given"):
        ImageProcessor()([])


def test_images_that_cannot_be_stacked():
    proc = ImageProcessor(do_center_crop=False)
    with pytest.raises(ImageError, match=r"image 0: \(3, 224, 298\), image 1: \(3, 224, 224\).*cannot be stacked"):
        proc([synthetic("RGB", 40, 30), synthetic("RGB", 30, 30)])


def test_preprocessor_config_that_is_not_json(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text("{'size': 224,}")
    with pytest.raises(ConfigError, match=f"{re_path(path)}: not valid JSON"):
        ImageProcessor.from_pretrained(tmp_path)


@pytest.mark.parametrize("config,message", [
    ({"size": {"short": 224}}, r"key 'size' has keys \['short'\]"),
    ({"size": {"shortest_edge": -5}}, "key 'size': shortest_edge must be a positive integer, got -5"),
    ({"size": {"longest_edge": 300}}, "key 'size'.*cannot drive a resize"),
    ({"crop_size": {"height": 224}}, r"key 'crop_size' has keys \['height'\]"),
    ({"crop_size": {"shortest_edge": 224}}, "key 'crop_size' must have 'height' and 'width'"),
    ({"crop_size": "224"}, "key 'crop_size' must be an integer, a .height, width. pair or a dict"),
    ({"resample": 7}, "key 'resample' must be a PIL filter code 0-5"),
    ({"image_mean": [0.5, 0.5]}, "key 'image_mean' must be a number or a list of 3 numbers"),
    ({"image_std": [0.5, 0, 0.5]}, "key 'image_std' must not contain 0"),
    ({"do_resize": "yes"}, "key 'do_resize' must be true or false"),
    ({"rescale_factor": "1/255"}, "key 'rescale_factor' must be a number"),
    ({"do_pad": True}, "key 'pad_size' must have 'height' and 'width' when do_pad is true"),
])
def test_bad_preprocessor_config_field_names_file_and_key(tmp_path, config, message):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{re_path(path)}: {message}"):
        ImageProcessor.from_pretrained(tmp_path)


def test_preprocessor_config_that_is_not_an_object(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text("[224]")
    with pytest.raises(ConfigError, match=f"{re_path(path)}: expected a JSON object, got list"):
        ImageProcessor.from_pretrained(tmp_path)


def test_from_pretrained_on_a_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="no-such-checkpoint: no such folder"):
        ImageProcessor.from_pretrained(tmp_path / "no-such-checkpoint")


def re_tuple(shape):
    return "\\(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + "\\)"


def re_path(path):
    return re.escape(str(path))
