"""The CPU set's C kernels that move values into place (kernels/cpu/layout.py) against the plain set's
tinygrad expressions (kernels/base.py): the same numbers bit for bit (the pixel values to a float32 rounding)."""
import numpy as np
import pytest
from tinygrad import Tensor

from tinyclip import pooling
from tinyclip._tinygrad import source
from tinyclip.kernels import TINYGRAD
from tinyclip.kernels.cpu import layout
from tinyclip.preprocess import PixelScaling

pytestmark = pytest.mark.skipif(not source.compiles_c("CPU"), reason="the CPU device does not compile C here")
RNG = np.random.default_rng(11)


def cpu(a: np.ndarray) -> Tensor:
    return Tensor(a, device="CPU").realize()


def test_text_embeddings_gather_rows_and_add_positions():
    tokens, positions = RNG.standard_normal((40, 24), np.float32), RNG.standard_normal((9, 24), np.float32)
    ids = RNG.integers(0, 40, (3, 7)).astype(np.int32)
    got = layout.embed_tokens(cpu(ids), cpu(tokens), cpu(positions)).numpy()
    want = TINYGRAD.embed_tokens(cpu(ids), cpu(tokens), cpu(positions)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, tokens[ids] + positions[:7])


def test_text_pooling_takes_the_row_of_the_rule_for_each_case():
    """The first end-of-text id; a row without one pools position 0; legacy configs (eos_token_id 2) the
    first of the largest id."""
    x = RNG.standard_normal((4, 6, 16), np.float32)
    ids = np.array([[5, 9, 7, 9, 1, 1], [3, 4, 4, 4, 4, 4], [9, 0, 0, 0, 0, 0], [8, 8, 2, 8, 1, 0]], np.int32)
    for eos in (9, pooling.LEGACY_EOS):
        got = layout.pool_rows(cpu(x), cpu(ids), eos, largest=eos == pooling.LEGACY_EOS).numpy()
        want = TINYGRAD.pool_text(cpu(x), cpu(ids), eos).numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, x[np.arange(4), pooling.positions(ids, eos)])


def test_class_token_patches_and_positions():
    x = RNG.standard_normal((2, 5, 8), np.float32)
    np.testing.assert_array_equal(layout.pool_rows(cpu(x)).numpy(), TINYGRAD.class_token(cpu(x)).numpy())
    images = RNG.standard_normal((2, 3, 12, 8), np.float32)
    got = layout.patches(cpu(images), 4).numpy()
    np.testing.assert_array_equal(got, TINYGRAD.patches(cpu(images), 4).numpy())
    assert got.shape == (2, 6, 48)
    cls, positions = RNG.standard_normal(48, np.float32), RNG.standard_normal((7, 48), np.float32)
    np.testing.assert_array_equal(layout.class_and_positions(cpu(got), cpu(cls), cpu(positions)).numpy(),
                                  TINYGRAD.class_and_positions(cpu(got), cpu(cls), cpu(positions)).numpy())


@pytest.mark.parametrize("scaling", [PixelScaling(1 / 255, (0.48145466, 0.4578275, 0.40821073),
                                                  (0.26862954, 0.26130258, 0.27577711)),
                                     PixelScaling(None, (0.5, 0.5, 0.5), None), PixelScaling(1 / 255, None, None)])
def test_pixel_values_from_uint8_crops(scaling):
    """Within a float32 rounding of the plain set's (which multiplies by 1/std where this divides), and
    of float64."""
    crops = RNG.integers(0, 256, (2, 6, 5, 3)).astype(np.uint8)
    got = layout.pixel_values(cpu(crops), scaling.scale, scaling.mean, scaling.std).numpy()
    want = TINYGRAD.pixel_values(cpu(crops), scaling).numpy()
    exact = crops.astype(np.float64) * (scaling.scale or 1)
    exact = (exact - np.array(scaling.mean or 0)) / np.array(scaling.std or 1)
    assert got.shape == want.shape == (2, 3, 6, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, exact.transpose(0, 3, 1, 2), rtol=0, atol=1e-6)


def test_keys_transposed_for_attention_with_zero_padding():
    k = RNG.standard_normal((2, 5, 12), np.float32)
    got = layout.heads_transposed(cpu(k), 3, 8).numpy().reshape(2, 3, 4, 8)
    want = np.zeros((2, 3, 4, 8), np.float32)
    want[..., :5] = k.reshape(2, 5, 3, 4).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)
