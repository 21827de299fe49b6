"""Images at any size: load(image_size=N) equals transformers' interpolate_pos_encoding=True.

transformers interpolates the position embeddings on every call; tinyclip does it once at load
(tinyclip/interpolate.py, a numpy bicubic written to equal torch's). The oracle sees the same
pixel values: transformers' own processor with size and crop_size set to N.
"""
import numpy as np
import pytest
import torch
import transformers

import tinyclip
from tinyclip import interpolate
from tinyclip.errors import UsageError
from tests.conftest import ROOT

EMBED_RTOL = 1e-5      # features, relative to the largest magnitude
INTERP_ATOL = 1e-12    # the interpolation alone, float64 against torch's float64
IMAGES = sorted(str(p) for p in (ROOT / "tests" / "data" / "images").iterdir() if p.suffix in (".png", ".jpg"))[:3]


def relative_error(ours, theirs) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("n_in, n_out", [(5, 7), (5, 3), (7, 16), (16, 7), (3, 3), (1, 4), (24, 37)])
def test_bicubic_equals_torchs_interpolate(n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    grid = rng.standard_normal((n_in, n_in, 3))
    theirs = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(n_out, n_out),
                                             mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(interpolate.bicubic(grid, n_out), theirs, rtol=0, atol=INTERP_ATOL)


@pytest.mark.parametrize("size", [18, 42])
def test_features_equal_transformers_interpolate_pos_encoding(tiny_quick, size):
    """tiny-quick is 30 x 30 pixels in 6-pixel patches: 18 shrinks its 5 x 5 grid to 3 x 3, 42 grows it to 7 x 7."""
    proc = transformers.CLIPImageProcessorPil.from_pretrained(tiny_quick.folder, size={"shortest_edge": size},
                                                              crop_size={"height": size, "width": size})
    from PIL import Image
    pixels = proc([Image.open(p) for p in IMAGES], return_tensors="np")["pixel_values"]
    with torch.no_grad():
        theirs = tiny_quick.torch_model.get_image_features(pixel_values=torch.from_numpy(pixels),
                                                           interpolate_pos_encoding=True)
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    model = tinyclip.load(tiny_quick.folder, device="cpu", image_size=size)
    assert model.config.vision_config.image_size == size
    np.testing.assert_allclose(model.preprocess(IMAGES), pixels, rtol=0, atol=1e-5)
    assert relative_error(model.encode_image(pixels), theirs) <= EMBED_RTOL     # pixel values as given
    assert relative_error(model.encode_image(IMAGES), theirs) <= EMBED_RTOL     # files, crops scaled on the device


def test_the_checkpoints_own_size_changes_nothing(tiny_quick):
    a = tinyclip.load(tiny_quick.folder, device="cpu")
    b = tinyclip.load(tiny_quick.folder, device="cpu", image_size=30)
    np.testing.assert_array_equal(a.encode_image(IMAGES), b.encode_image(IMAGES))


@pytest.mark.parametrize("size, nearest", [(40, "36 or 42"), (4, "6"), (31, "30 or 36")])
def test_a_size_that_is_not_a_multiple_of_the_patch_names_the_nearest(tiny_quick, size, nearest):
    with pytest.raises(UsageError, match=f"image_size {size} is not a multiple of the patch size 6; the nearest "
                                         f"sizes that work are {nearest}$"):
        tinyclip.load(tiny_quick.folder, device="cpu", image_size=size)


@pytest.mark.parametrize("size", [0, -6, 6.0, True, "36"])
def test_a_size_that_is_not_a_positive_integer_is_refused(tiny_quick, size):
    with pytest.raises(UsageError, match="image_size must be a positive integer"):
        tinyclip.load(tiny_quick.folder, device="cpu", image_size=size)


def test_the_graph_cache_key_includes_the_image_size(tiny_quick):
    from tinyclip.graph_cache import key
    a = tinyclip.load(tiny_quick.folder, device="cpu", image_size=36)
    b = tinyclip.load(tiny_quick.folder, device="cpu", image_size=42)
    assert key.architecture_hash(a.model) != key.architecture_hash(b.model)
