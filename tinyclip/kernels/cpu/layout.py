"""Moving values into place on the CPU, as C source: the text embeddings, pixel values from uint8 crops,
a ViT's patches and its class and position embeddings, the pooled rows, attention's keys transposed.

Each is a copy, a gather or a single add: exactly the numbers of the tinygrad expressions they replace
(kernels/base.py), except the pixel values (see `pixel_values`). They are written as C for the time a
first run waits, not for speed: tinygrad generates each of these small kernels' code in Python in
0.05-0.2 s of CPU (ViT-B/32's two towers had 14 such kernels, about 2 s of CPU in compile workers, most
of a cold start's compiling), where clang compiles the C text with the other C kernels of the graph in
one run. Only where the device compiles C (source.compiles_c) and the values are float32; elsewhere the
plain set's expressions run.
"""
from __future__ import annotations

import hashlib
import math

from tinygrad import Tensor, dtypes

from ..._tinygrad import source
from . import csource


def runs_here(*tensors: Tensor) -> bool:
    """Whether these kernels take these values (float32 tables and states, uint8 crops; token ids are int32
    and not asked about): on a device compiling C."""
    return source.compiles_c(tensors[0].device) and all(t.dtype in (dtypes.float32, dtypes.uint8) for t in tensors)


def embed_tokens(ids: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
    """tokens[ids] + positions[:T] for (B, T) int32 ids: (B, T, C)."""
    B, T = ids.shape
    V, C = tokens.shape
    name = f"embed_{B}_{T}_{V}_{C}"
    return source.run_c(name, csource.embed_tokens(name, B * T, T, V, C), B * T * C,
                        [ids.cast(dtypes.int32).reshape(-1), tokens.reshape(-1), positions.reshape(-1)]).reshape(B, T, C)


def pool_rows(x: Tensor, ids: Tensor | None = None, eos_token_id: int | None = None, largest: bool = False) -> Tensor:
    """x[b, position b] for (B, T, C) x: position 0 without ids; with (B, T) ids, the first `eos_token_id`
    (or, `largest`, the first of the largest id), else 0 (pooling.py's rule). (B, C)."""
    B, T, C = x.shape
    rule = "first" if ids is None else "largest" if largest else "eos"
    name = f"pool_{rule}_{B}_{T}_{C}" + (f"_{eos_token_id}" if rule == "eos" else "")
    inputs = [x.reshape(-1)] + ([] if ids is None else [ids.cast(dtypes.int32).reshape(-1)])
    code = csource.pool_rows(name, B, T, C, rule, eos_token_id or 0)
    return source.run_c(name, code, B * C, inputs).reshape(B, C)


def heads_transposed(k: Tensor, heads: int, Tp: int) -> Tensor:
    """(B, T, C) keys -> (B, heads, d, Tp), positions contiguous, zero past T."""
    B, T, C = k.shape
    d = C // heads
    name = f"keys_{B}_{T}_{heads}_{d}_{Tp}"
    return source.run_c(name, csource.heads_transposed(name, B, T, heads, d, Tp), B * C * Tp, [k.reshape(-1)])


def pixel_values(crops: Tensor, scale: float | None, mean, std) -> Tensor:
    """(N, H, W, C) uint8 crops -> (N, C, H, W) float32: (x * scale - mean) / std per channel, each step
    skipped where None. The division is a true float32 division, where tinygrad's expression multiplies by
    the reciprocal: within a float32 rounding of each other (pixels.py's bound covers both)."""
    N, H, W, C = crops.shape
    digest = hashlib.sha256(repr((scale, mean, std)).encode()).hexdigest()[:8]   # a name; the source holds the values
    name = f"pixels_{N}_{H}_{W}_{C}_{digest}"
    code = csource.pixel_values(name, N, H, W, C, scale, mean, std)
    return source.run_c(name, code, math.prod(crops.shape), [crops.reshape(-1)]).reshape(N, C, H, W)


def patches(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p): the non-overlapping patches, each (C, p, p) in order."""
    B, C, H, W = x.shape
    G = (H // p) * (W // p)
    name = f"patches_{B}_{C}_{H}_{W}_{p}"
    return source.run_c(name, csource.patches(name, B, C, H, W, p), B * G * C * p * p,
                        [x.reshape(-1)]).reshape(B, G, C * p * p)


def class_and_positions(patches_: Tensor, cls: Tensor, positions: Tensor) -> Tensor:
    """[cls, patches[b]] + positions for (B, G, C) patch embeddings: (B, 1 + G, C)."""
    B, G, C = patches_.shape
    name = f"tokens_{B}_{G}_{C}"
    return source.run_c(name, csource.class_and_positions(name, B, G, C), B * (G + 1) * C,
                        [patches_.reshape(-1), cls.reshape(-1), positions.reshape(-1)]).reshape(B, G + 1, C)
