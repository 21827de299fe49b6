"""Convolutions (the ResNet image tower) on the CPU as im2col onto the tiled matmul (matmul.py).

A k x k convolution is a matmul of every output pixel's k*k*C input patch with the (out, k*k*C)
weight: the input goes channels-last, the k*k shifted views are concatenated along the channels
(for k = 1 the input itself), and the weight is stored as panels like a linear layer's. The patch
order is (ky, kx, channel), so the weight is permuted to match once at load.
"""
from __future__ import annotations

from tinygrad import Tensor


def weight_matrix(weight: Tensor) -> Tensor:
    """(out, C, k, k) -> (out, k*k*C) in the patch order of `patches`."""
    out, channels, k, _ = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(out, k * k * channels)


def patches(x: Tensor, kernel: int, stride: int, padding: int) -> Tensor:
    """(B, C, H, W) -> (B, Ho*Wo, k*k*C): each output pixel's input patch, channels last."""
    B, C, H, W = x.shape
    ho, wo = (H + 2 * padding - kernel) // stride + 1, (W + 2 * padding - kernel) // stride + 1
    x = x.permute(0, 2, 3, 1)                                                            # (B, H, W, C)
    if padding:
        x = x.pad(((0, 0), (padding, padding), (padding, padding), (0, 0)))
    if kernel == 1 and stride == 1:
        cols = x
    else:
        views = [x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                 for i in range(kernel) for j in range(kernel)]                          # k*k of (B, Ho, Wo, C)
        cols = views[0].cat(*views[1:], dim=-1) if len(views) > 1 else views[0]
    return cols.reshape(B, ho * wo, kernel * kernel * C), (ho, wo)


def conv2d(x: Tensor, weight, bias: Tensor, stride: int, padding: int, kernel: int, linear) -> Tensor:
    """conv(x) + bias through `linear(patches, weight, bias)` (the kernel set's linear on a weight it
    prepared from `weight_matrix`); NCHW in and out."""
    cols, (ho, wo) = patches(x, kernel, stride, padding)
    y = linear(cols.contiguous(), weight, bias)                                          # (B, Ho*Wo, out)
    return y.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)                         # (B, out, Ho, Wo)
