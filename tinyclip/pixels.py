"""Pixel values made on the device from uint8 crops.

An image processor's steps split in two: those that give a uint8 crop (decoding, RGB conversion,
resize and crop, in Pillow on the host) and the float ones after (rescale, normalize). Uploading the
crops, (N, H, W, C) uint8 as Pillow and numpy lay them out, moves a quarter of the bytes of float32
pixel values; the encoder graph then converts and normalises them before the vision model, in float32
whatever the model's dtype (as the host does, and before the vision model's own cast).

`preprocess.PixelScaling` holds the float steps of one processor (its scaling()); `pixel_values`
computes them in the graph, in float32, with the processors' operations, (x * scale - mean) / std.
tinygrad divides by multiplying with the reciprocal, and CLIP's ImageProcessor rescales in float64:
the pixel values differ from preprocess()'s by a few float32 rounding steps (about 5e-7 on values of
magnitude 2; PIXEL_TOL = 1e-5 bounds them in tests/test_host_path.py).
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor, dtypes

from . import _tinygrad
from .preprocess import PixelScaling


def pixel_values(crops: Tensor, scaling: PixelScaling) -> Tensor:
    """(N, H, W, C) uint8 crops -> (N, C, H, W) float32 pixel values, on the crops' device: the float
    steps of `scaling` (preprocess.PixelScaling), in float32 as the processors compute them."""
    x = crops.cast(dtypes.float32)
    if scaling.scale is not None:
        x = x * float32(scaling.scale)
    if scaling.mean is not None:
        x = x - _constant(scaling.mean, crops.device)
    if scaling.std is not None:
        x = x / _constant(scaling.std, crops.device)
    return x.permute(0, 3, 1, 2)                                                      # (N, C, H, W)


def float32(value: float | None) -> float | None:
    """`value` rounded to float32 (as the processors' rescale factor is), None kept."""
    return None if value is None else float(np.float32(value))


def _constant(values: tuple[float, ...], device: str) -> Tensor:
    # a float32 buffer, as the processors round mean and std to float32 before subtracting or dividing
    return _tinygrad.from_numpy(np.array(values, np.float32), device)

