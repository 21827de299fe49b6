"""Pixel values made on the device from uint8 crops.

An image processor's steps split in two: those that give a uint8 crop (decoding, RGB conversion,
resize and crop, in Pillow on the host) and the float ones after (rescale, normalize). Uploading the
crops, (N, H, W, C) uint8 as Pillow and numpy lay them out, moves a quarter of the bytes of float32
pixel values; the encoder graph then converts and normalises them before the vision model, in float32
whatever the model's dtype (as the host does, and before the vision model's own cast).

`PixelScaling` holds the float steps of one processor. The device computes them in float32 with the
same operations as the processors, (x * scale - mean) / std, but tinygrad divides by multiplying with
the reciprocal and float64 rescaling (CLIP's ImageProcessor) becomes float32: the pixel values differ
from preprocess()'s by a few float32 rounding steps (PIXEL_TOL bounds them in the tests).
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
from tinygrad import Tensor, dtypes

from . import _tinygrad


@dataclasses.dataclass(frozen=True)
class PixelScaling:
    """The float steps after the uint8 crop, each per channel and skipped when None:
    x * scale, then (x - mean) / std."""
    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def key(self) -> str:
        """A short name for these steps, exact (float.hex) and the same in every process: part of the
        graph cache key of the encoder graphs that compute them (their constants are in the graph)."""
        text = repr((_hex(self.scale), _hex(self.mean), _hex(self.std)))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def pixel_values(self, crops: Tensor) -> Tensor:
        """(N, H, W, C) uint8 crops -> (N, C, H, W) float32 pixel values, on the crops' device."""
        x = crops.cast(dtypes.float32)
        if self.scale is not None:
            x = x * float(np.float32(self.scale))
        if self.mean is not None:
            x = x - _constant(self.mean, crops.device)
        if self.std is not None:
            x = x / _constant(self.std, crops.device)
        return x.permute(0, 3, 1, 2)                                                  # (N, C, H, W)


def _constant(values: tuple[float, ...], device: str) -> Tensor:
    # a float32 buffer, as the processors round mean and std to float32 before subtracting or dividing
    return _tinygrad.from_numpy(np.array(values, np.float32), device)


def _hex(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(float(v).hex() for v in value)
    return float(value).hex()
