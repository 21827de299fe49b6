"""The kernel-set interface, and its plain tinygrad implementation that every device runs."""
from __future__ import annotations

import contextlib
import copy
import math

from tinygrad import Tensor, dtypes

from .. import _tinygrad, pixels, pooling
from ..errors import BackendError
from .activations import activation

# dtypes that only the linear layers compute in (load(dtype=...)): the model around them stays float32 (layer
# norms, softmax and attention, embeddings, the final normalisation), and the kernel set that can run the
# dtype converts each linear weight once at load (prepare_linear) and computes the layer with it (linear).
LINEAR_DTYPES = ("bfloat16", "int8")


# Compiling a text graph costs about as much work as encoding this many tokens (batch rows x positions):
# ViT-B/32's text tower compiles in 10-15 s on 2 cores of an AVX-512 Zen 4 and encodes 1,300-2,500 tokens
# a second there. A smaller model or a GPU encodes faster still, so the rule pads more there, never less.
TEXT_COMPILE_TOKENS = 20_000
# The same for an image graph, in images: 10-15 s to compile ViT-B/32's image tower, 25-40 ms an image.
IMAGE_COMPILE_IMAGES = 300


def causal_mask(T: int, dtype, device: str) -> Tensor:
    """(1, 1, T, T): 0 on and below the diagonal, -inf above: each position sees itself and those before."""
    causal = Tensor.ones(T, T, device=device, dtype=dtypes.bool).triu(1)
    return causal.where(-math.inf, 0.0).cast(dtype).reshape(1, 1, T, T)


class KernelSet:
    """CLIP's hot operations, as one device family computes them. Subclass and override what a device
    does better; every method here is plain tinygrad, exact on every device.

    A kernel set holds no tensors (the model's modules refer to it, and tinygrad's get_state_dict
    walks them), and `key()` says what in it shapes a compiled graph (the graph cache keys on it).
    """

    name = "tinygrad"
    linear_dtype: str | None = None    # one of LINEAR_DTYPES, or None: linear layers compute in the model's dtype
    _handed_over: frozenset = frozenset()    # buffers prepare_linear may rewrite in place (handing_over)

    def key(self) -> dict:
        """What distinguishes this set's graphs from another's: its name and its parameters."""
        return {"name": self.name, **({"linear_dtype": self.linear_dtype} if self.linear_dtype else {})}

    def describe(self) -> str:
        """One line for `tinyclip backends`."""
        return "tinygrad's own kernels"

    def compile_costs(self) -> tuple[float, float]:
        """What compiling one graph of this set costs, as work it could have encoded instead: (text tokens,
        images), for the batch planner (batch_plan.py; called inside the backend's context). tinygrad
        generates its kernels' code in Python: 10-15 s for a ViT-B/32 tower on 2 cores."""
        return TEXT_COMPILE_TOKENS, IMAGE_COMPILE_IMAGES

    # ---- linear layers ----------------------------------------------------------------------------

    def linear_dtype_problem(self, name: str) -> str | None:
        """Why this set cannot compute linear layers in `name` (one of LINEAR_DTYPES) here, in one
        sentence, or None where it can. The plain set runs none of them."""
        needs = "avx512_bf16" if name == "bfloat16" else "VNNI (avx512_vnni or avx_vnni)"
        return (f"{name} linear layers run only in tinyclip's CPU kernels (the cpu backend, on an x86-64 CPU with "
                f"{needs}); this backend computes with tinygrad's own kernels")

    def with_linear_dtype(self, name: str) -> "KernelSet":
        """A copy of this set whose linear layers compute in `name` (one of LINEAR_DTYPES), from weights
        prepare_linear converts at load; a one-line BackendError where this set cannot."""
        if name not in LINEAR_DTYPES:
            raise ValueError(f"{name!r} is not one of {', '.join(LINEAR_DTYPES)}")
        if why := self.linear_dtype_problem(name):
            raise BackendError(why)
        chosen = copy.copy(self)
        chosen.linear_dtype = name
        return chosen

    def without_linear_dtype(self) -> "KernelSet":
        """This set with its linear layers in the model's own dtype: for the final projections, which stay
        float32 whatever the linear dtype (their outputs are the embeddings)."""
        if self.linear_dtype is None:
            return self
        exact = copy.copy(self)
        exact.linear_dtype = None
        return exact

    def tune_machine(self) -> str | None:
        """Measure what this set's kernels are shaped by on this machine and keep it (`tinyclip tune`); a
        line saying what was chosen, or None where the set measures nothing (the plain set)."""
        return None

    def prepare_linear(self, weight: Tensor) -> Tensor:
        """A linear layer's weight (out, in), as the checkpoint has it, in the form linear() takes:
        called once after loading. The plain set keeps it as it is. A weight whose buffer was handed
        over (`handing_over`) may be rearranged in that buffer; any other is left as it is."""
        return weight

    @contextlib.contextmanager
    def handing_over(self, buffers):
        """Around model.prepare() after a fresh read (towers.py): `buffers` (BUFFER graph nodes) were made by
        the read and are each held by one parameter alone, so prepare_linear may rewrite them in place
        instead of filling new ones. A weight a caller filled itself, or one shared by two parameters, is
        never in it (the caller may still read it)."""
        self._handed_over = frozenset(buffers)
        try:
            yield
        finally:
            self._handed_over = frozenset()

    def handed_over(self, weight: Tensor) -> bool:
        """Whether `weight`'s buffer was handed over (handing_over) and may be rewritten."""
        return _tinygrad.buffer_of(weight) in self._handed_over

    def preparing(self, source) -> contextlib.AbstractContextManager:
        """A context around model.prepare(), for a set that keeps what prepare_linear makes on disk (the
        int8 set's quantised weights): `source` is a callable giving what identifies the weights prepared
        (the checkpoint's fingerprint and the tower; towers.py), called only by such a set, or None to keep
        nothing. The plain set keeps nothing."""
        return contextlib.nullcontext()

    def dense_weight(self, weight: Tensor) -> Tensor:
        """The inverse of prepare_linear: the weight as (out, in)."""
        return weight

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None,
               residual: Tensor | None = None) -> Tensor:
        """act(x @ W.T + bias) + residual, for W as prepare_linear returned it; `act` a config
        hidden_act name, or None."""
        y = x.linear(weight.T, bias)
        y = y if act is None else activation(act)(y)
        return y if residual is None else y + residual

    # ---- convolutions (the ResNet image tower) ----------------------------------------------------

    def prepare_conv2d(self, weight: Tensor) -> Tensor:
        """A convolution's weight (out, in, k, k), as the checkpoint has it (its batch norm folded in),
        in the form conv2d() takes: called once after loading. The plain set keeps it as it is."""
        return weight

    def conv2d(self, x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int, kernel: int,
               act: str | None = None) -> Tensor:
        """act(conv(x, W) + bias) for NCHW x and W as prepare_conv2d returned it (square `kernel`);
        `act` a config hidden_act name, or None."""
        y = x.conv2d(weight, bias, stride=stride, padding=padding)
        return y if act is None else activation(act)(y)

    # ---- attention --------------------------------------------------------------------------------

    def attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False) -> Tensor:
        """softmax(q k^T / sqrt(d) [+ causal mask]) v per head, for (B, T, C) projections; (B, T, C).
        `causal`: position i attends to positions 0..i only (the text tower)."""
        B, T, C = q.shape
        d = C // heads
        q, k, v = (t.reshape(B, T, heads, d).transpose(1, 2) for t in (q, k, v))      # (B, nh, T, hs)
        scores = (q * d ** -0.5) @ k.transpose(-2, -1)                                   # (B, nh, T, T)
        attn = self.softmax(scores, causal_mask(T, q.dtype, q.device) if causal else None)
        attn = attn.cast(v.dtype).contiguous()   # once, not per output column
        return (attn @ v).transpose(1, 2).reshape(B, T, C)                              # (B, T, C)

    def softmax(self, scores: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(scores + mask) over the last axis, in float32."""
        if mask is not None:
            scores = scores + mask
        return scores.float().softmax(-1)

    # ---- moving values into place: embeddings, patches, pooling --------------------------------------

    def embed_tokens(self, ids: Tensor, tokens: Tensor, positions: Tensor) -> Tensor:
        """The text embeddings: tokens[ids] + positions[:T] for (B, T) ids; (B, T, C)."""
        return _tinygrad.gather_rows(tokens, ids) + positions[:ids.shape[-1]]

    def pool_text(self, x: Tensor, ids: Tensor, eos_token_id: int) -> Tensor:
        """x[b, the position row b pools from] (pooling.py's rule) for (B, T, C) states; (B, C)."""
        pool = pooling.one_hot(ids, eos_token_id)                                      # (B, T)
        return (x * pool.unsqueeze(-1).cast(x.dtype)).sum(1)

    def class_token(self, x: Tensor) -> Tensor:
        """x[:, 0] for (B, T, C) states: a ViT's class token; (B, C)."""
        return x[:, 0]

    def pixel_values(self, crops: Tensor, scaling) -> Tensor:
        """(N, H, W, C) uint8 crops -> (N, C, H, W) float32 pixel values: the float steps of `scaling`
        (preprocess.PixelScaling), pixels.py."""
        return pixels.pixel_values(crops, scaling)

    def patches(self, x: Tensor, patch: int) -> Tensor:
        """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p): the non-overlapping p x p patches, each (C, p, p) in
        order (H and W multiples of p): a patch convolution as a matmul's rows."""
        B, C, H, W = x.shape
        g_h, g_w = H // patch, W // patch
        x = x.reshape(B, C, g_h, patch, g_w, patch).permute(0, 2, 4, 1, 3, 5)          # (B, gh, gw, C, p, p)
        return x.reshape(B, g_h * g_w, C * patch * patch)

    def class_and_positions(self, patches: Tensor, cls: Tensor, positions: Tensor) -> Tensor:
        """[cls, patches[b]] + positions for (B, G, C) patch embeddings: a ViT's tokens; (B, 1 + G, C)."""
        B = patches.shape[0]
        return cls.reshape(1, 1, -1).expand(B, 1, -1).cat(patches, dim=1) + positions

    # ---- layer norm -------------------------------------------------------------------------------

    def layer_norm(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        """Layer norm over the last axis, computed in float32 whatever x's dtype, returned in x's."""
        y = x.float().layernorm(eps=eps) * weight.float() + bias.float()
        return y.cast(x.dtype)

    def __repr__(self) -> str:
        return f"<kernel set {self.name}: {self.describe()}>"


TINYGRAD = KernelSet()
