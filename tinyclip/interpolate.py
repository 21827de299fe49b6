"""Position embeddings for another image size: torch's bicubic interpolation, in numpy.

transformers' `CLIPVisionEmbeddings.interpolate_pos_encoding` resizes the grid of patch position
embeddings with `torch.nn.functional.interpolate(..., size=(new, new), mode="bicubic",
align_corners=False)`; `bicubic` computes the same (aten's `upsample_bicubic2d`: cubic convolution
with A = -0.75, source x = (x' + 0.5) * in / out - 0.5, not clamped, taps clamped to the edge).
"""
from __future__ import annotations

import math

import numpy as np

CUBIC_A = -0.75   # torch's (and OpenCV's) cubic convolution constant


def _near(x: float) -> float:    # |x| <= 1
    return ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1


def _far(x: float) -> float:     # 1 < |x| < 2
    return ((CUBIC_A * x - 5 * CUBIC_A) * x + 8 * CUBIC_A) * x - 4 * CUBIC_A


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64: one axis of torch's bicubic resize from n_in to n_out samples."""
    scale = n_in / n_out
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = scale * (i + 0.5) - 0.5
        left = math.floor(x)
        t = x - left
        for offset, weight in zip((-1, 0, 1, 2), (_far(t + 1), _near(t), _near(1 - t), _far(2 - t))):
            m[i, min(max(left + offset, 0), n_in - 1)] += weight
    return m


def bicubic(grid: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) -> (size, size, C), float64."""
    rows, cols = bicubic_matrix(grid.shape[0], size), bicubic_matrix(grid.shape[1], size)
    return np.einsum("oh,hwc,pw->opc", rows, grid.astype(np.float64), cols)


def position_embeddings(weight: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """A ViT's position embeddings (1 + g*g, C) for images of `image_size`: the class position as it
    is, the g x g grid of patch positions resized bicubically to (image_size // patch_size)^2;
    unchanged where the grid already has that size (as transformers returns them unchanged)."""
    g = math.isqrt(weight.shape[0] - 1)
    new = image_size // patch_size
    if new == g:
        return weight
    grid = weight[1:].reshape(g, g, -1)
    resized = bicubic(grid, new).reshape(new * new, -1)
    return np.concatenate([weight[:1].astype(np.float64), resized]).astype(weight.dtype)
