"""The activations a config's hidden_act may name, as transformers' ACT2FN computes them."""
from __future__ import annotations

import math

from ..config import ACTIVATIONS


def activation(name: str):
    """The function transformers' ACT2FN[name] computes, on tinygrad Tensors."""
    if name == "quick_gelu":
        return lambda x: x * (x * 1.702).sigmoid()
    if name == "gelu":   # exact GELU through erf, not tinygrad's default tanh approximation
        return lambda x: x * 0.5 * (1.0 + (x * (1 / math.sqrt(2))).erf())
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: 0.5 * x * (1.0 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())
    if name == "relu":
        return lambda x: x.relu()
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")   # config validation rejects these first
