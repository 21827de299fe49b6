"""CLIP as a tree of plain tinygrad modules.

Attribute names mirror the keys of a Hugging Face CLIPModel checkpoint
(`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`vision_model.pre_layrnorm.weight`, `logit_scale`, ...), so
`tinygrad.nn.state.get_state_dict(model)` lists exactly the parameters a
checkpoint must provide and loading is a strict key/shape check plus a copy.

Every module takes and returns tinygrad Tensors and stays on their device.
Parameters are created empty; `tinyclip.weights.load_weights` fills them.
LayerNorm and softmax always compute in float32, whatever the weights' dtype,
as OpenAI's and open_clip's float16 inference does.
"""
from __future__ import annotations

import math

from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from . import _tinygrad, kernels
from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig


def _param(shape: tuple[int, ...], dtype: DType, device: str) -> Tensor:
    return Tensor.empty(*shape, dtype=dtype, device=device)


def activation(name: str):
    """The function transformers' ACT2FN[name] computes (config.ACTIVATIONS lists the names)."""
    if name == "quick_gelu":
        return lambda x: x * (x * 1.702).sigmoid()
    if name == "gelu":   # exact GELU through erf, not tinygrad's default tanh approximation
        return lambda x: x * 0.5 * (1.0 + (x * (1 / math.sqrt(2))).erf())
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: 0.5 * x * (1.0 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)).tanh())
    if name == "relu":
        return lambda x: x.relu()
    raise ValueError(f"unknown activation {name!r}")   # config.validate rejects these first


class Linear:
    """y = x @ weight.T + bias. `weight` is (out, in) as in the checkpoint, until to_panels()
    stores it as (out/P, in, P) panels for tinyclip.kernels' CPU matmul (same products, summed
    in float32 in another order)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: DType, device: str):
        self.weight = _param((out_features, in_features), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None
        self.panels = False

    def __call__(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """The layer, then the activation `act` (a config hidden_act name) when given, then + residual
        when given: on panels CLIP's quick_gelu (kernels.quick_gelu) and the residual are applied
        inside the matmul kernel."""
        if self.panels and act in (None, "quick_gelu"):   # all of it in the matmul kernel
            return kernels.panel_linear(x, self.weight, self.bias, kernels.quick_gelu if act else None, residual)
        y = kernels.panel_linear(x, self.weight, self.bias) if self.panels else x.linear(self.weight.T, self.bias)
        y = y if act is None else activation(act)(y)
        return y if residual is None else y + residual

    @property
    def dense_weight(self) -> Tensor:
        """The weight as the checkpoint has it, (out, in), whichever way it is stored."""
        if not self.panels:
            return self.weight
        n_panels, fan_in, width = self.weight.shape
        return self.weight.permute(0, 2, 1).reshape(n_panels * width, fan_in)

    def to_panels(self) -> None:
        _store_panels(self, self.weight)


def _store_panels(layer, dense: Tensor) -> None:
    """Replace layer.weight by tinyclip.kernels panels of `dense` (the weight as (out, in)), once,
    where the weight is float32 and its outputs divide into panels."""
    width = kernels.panel_width(layer.weight.shape[0])
    if layer.panels or width is None or layer.weight.dtype != dtypes.float32:
        return
    layer.weight, layer.panels = kernels.to_panels(dense, width), True


class LayerNorm:
    """Over the last axis, in float32 whatever the weights' dtype. to_panels() moves a float32 one
    whose width is a multiple of 8 from 16 onto tinyclip.kernels.layer_norm (one kernel, not three)."""

    def __init__(self, dim: int, eps: float, dtype: DType, device: str):
        self.weight, self.bias, self.eps = _param((dim,), dtype, device), _param((dim,), dtype, device), eps
        self.fused = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.fused and x.dtype == dtypes.float32:
            return kernels.layer_norm(x, self.weight, self.bias, self.eps)
        y = x.float().layernorm(eps=self.eps) * self.weight.float() + self.bias.float()
        return y.cast(x.dtype)

    def to_panels(self) -> None:
        width = self.weight.shape[0]
        self.fused = self.weight.dtype == dtypes.float32 and width % 8 == 0 and width >= 16


class Embedding:
    def __init__(self, num: int, dim: int, dtype: DType, device: str):
        self.weight = _param((num, dim), dtype, device)

    def __call__(self, idx: Tensor) -> Tensor:
        return _tinygrad.gather_rows(self.weight, idx)


class CLIPAttention:
    def __init__(self, hidden: int, heads: int, dtype: DType, device: str):
        self.num_heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Linear(hidden, hidden, True, dtype, device) for _ in range(4))

    def __call__(self, x: Tensor, mask: Tensor | None, residual: Tensor | None = None) -> Tensor:
        """Self-attention over x, plus `residual` when given (added by out_proj)."""
        B, T, C = x.shape
        if self.q_proj.panels:   # float32 on the CPU: tinyclip.kernels' register-tiled products
            out = kernels.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, mask)
            return self.out_proj(out, residual=residual)
        q, k, v = (p(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)   # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = (q * self.head_dim ** -0.5) @ k.transpose(-2, -1)                       # (B, nh, T, T)
        if mask is not None:
            scores = scores + mask
        attn = scores.float().softmax(-1).cast(v.dtype).contiguous()   # once, not per output column
        out = (attn @ v).transpose(1, 2).reshape(B, T, C)                               # (B, T, C)
        return self.out_proj(out, residual=residual)


class CLIPMLP:
    def __init__(self, hidden: int, intermediate: int, act: str, dtype: DType, device: str):
        activation(act)   # an unknown name fails here, not at the first call
        self.act = act
        self.fc1 = Linear(hidden, intermediate, True, dtype, device)
        self.fc2 = Linear(intermediate, hidden, True, dtype, device)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.fc2(self.fc1(x, act=self.act), residual=residual)


class CLIPEncoderLayer:
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, dtype: DType, device: str):
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, dtype, device)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, device)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)

    def __call__(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.self_attn(self.layer_norm1(x), mask, residual=x)      # x + attention(norm(x))
        return self.mlp(self.layer_norm2(x), residual=x)               # x + mlp(norm(x))


class CLIPEncoder:
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, dtype: DType, device: str):
        self.layers = [CLIPEncoderLayer(cfg, dtype, device) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextEmbeddings:
    def __init__(self, cfg: CLIPTextConfig, dtype: DType, device: str):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype, device)

    def __call__(self, input_ids: Tensor) -> Tensor:
        T = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]


class CLIPTextTransformer:
    def __init__(self, cfg: CLIPTextConfig, dtype: DType, device: str):
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype, device)
        self.encoder = CLIPEncoder(cfg, dtype, device)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)

    def __call__(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, hidden) pooled states, before the projection."""
        B, T = input_ids.shape
        x = self.embeddings(input_ids)                                                # (B, T, hidden)
        causal = Tensor.ones(T, T, device=x.device, dtype=dtypes.bool).triu(1)
        mask = causal.where(-math.inf, 0.0).cast(x.dtype).reshape(1, 1, T, T)
        x = self.final_layer_norm(self.encoder(x, mask))
        return (x * self.pool_weights(input_ids).unsqueeze(-1).cast(x.dtype)).sum(1)   # (B, hidden)

    def pool_weights(self, input_ids: Tensor) -> Tensor:
        """One-hot (B, T) of the token whose state is the text embedding.

        Like transformers: the first `eos_token_id`, or for legacy configs
        with eos_token_id == 2 the first occurrence of the largest id
        (modeling_clip.py, CLIPTextTransformer.forward, "PR #24773"). A row
        without a match pools position 0, as torch's argmax of all-False does.
        """
        ids = input_ids.cast(dtypes.int32)
        target = ids.max(-1, keepdim=True) if self.config.eos_token_id == 2 else self.config.eos_token_id
        hit = (ids == target).cast(dtypes.int32)
        first = hit * (hit.cumsum(-1) == 1).cast(dtypes.int32)
        none = (hit.sum(-1, keepdim=True) == 0).cast(dtypes.int32)
        pos0 = (Tensor.ones(1, ids.shape[-1], device=ids.device, dtype=dtypes.int32).cumsum(-1) == 1).cast(dtypes.int32)
        return first + none * pos0


class CLIPVisionEmbeddings:
    def __init__(self, cfg: CLIPVisionConfig, dtype: DType, device: str):
        self.patch_size, self.image_size = cfg.patch_size, cfg.image_size
        n_pos = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = _param((cfg.hidden_size,), dtype, device)
        self.patch_embedding = Conv2dPatch(cfg.num_channels, cfg.hidden_size, cfg.patch_size, dtype, device)
        self.position_embedding = Embedding(n_pos, cfg.hidden_size, dtype, device)

    def __call__(self, pixel_values: Tensor) -> Tensor:
        B = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)                                  # (B, g*g, hidden)
        cls = self.class_embedding.reshape(1, 1, -1).expand(B, 1, -1)
        return cls.cat(patches, dim=1) + self.position_embedding.weight               # (B, g*g+1, hidden)


class Conv2dPatch:
    """A Conv2d whose stride equals its kernel and has no bias (weight (out, C, p, p)),
    computed as one matmul over the non-overlapping patches: same sums, faster kernels.
    to_panels() stores the weight as tinyclip.kernels panels, like Linear's."""

    def __init__(self, channels: int, hidden: int, patch: int, dtype: DType, device: str):
        self.weight = _param((hidden, channels, patch, patch), dtype, device)
        self.patch, self.panels = patch, False

    def __call__(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        p = self.patch
        g_h, g_w = H // p, W // p
        x = x.reshape(B, C, g_h, p, g_w, p).permute(0, 2, 4, 1, 3, 5)                 # (B, gh, gw, C, p, p)
        x = x.reshape(B, g_h * g_w, C * p * p)
        if self.panels:
            return kernels.panel_linear(x, self.weight, None)                         # (B, gh*gw, hidden)
        D = self.weight.shape[0]
        return x @ self.weight.reshape(D, C * p * p).T                                # (B, gh*gw, hidden)

    def to_panels(self) -> None:
        _store_panels(self, self.weight.reshape(self.weight.shape[0], -1))


class CLIPVisionTransformer:
    def __init__(self, cfg: CLIPVisionConfig, dtype: DType, device: str):
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype, device)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)   # sic: HF's key
        self.encoder = CLIPEncoder(cfg, dtype, device)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device)

    def __call__(self, pixel_values: Tensor) -> Tensor:
        """(B, C, S, S) pixels -> (B, hidden) pooled class-token states, before the projection."""
        x = self.pre_layrnorm(self.embeddings(pixel_values.cast(self.embeddings.class_embedding.dtype)))
        return self.post_layernorm(self.encoder(x)[:, 0])


class CLIPModel:
    """The whole CLIPModel: `get_image_features`, `get_text_features` and `__call__`
    (logits_per_image) with transformers' names and semantics."""

    def __init__(self, config: CLIPConfig, dtype: DType = dtypes.float32, device: str = "CPU"):
        self.config = config
        self.text_model = CLIPTextTransformer(config.text_config, dtype, device)
        self.vision_model = CLIPVisionTransformer(config.vision_config, dtype, device)
        self.visual_projection = Linear(config.vision_config.hidden_size, config.projection_dim, False, dtype, device)
        self.text_projection = Linear(config.text_config.hidden_size, config.projection_dim, False, dtype, device)
        self.logit_scale = _param((), dtype, device)

    def to_panels(self) -> None:
        """Move every float32 layer onto tinyclip.kernels (after loading): Linear weights stored as
        panels, layer norms on the one-kernel layer_norm."""
        for layer in _walk(self):
            if isinstance(layer, (Linear, Conv2dPatch, LayerNorm)):
                layer.to_panels()

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, projection_dim), projected and not normalised."""
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids: Tensor) -> Tensor:
        """(B, T) -> (B, projection_dim), projected and not normalised."""
        return self.text_projection(self.text_model(input_ids))

    def logits(self, image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
        """logits_per_image (N_images, N_texts) from the two feature sets."""
        img = image_embeds.float()
        txt = text_embeds.float()
        img = img / (img * img).sum(-1, keepdim=True).sqrt()
        txt = txt / (txt * txt).sum(-1, keepdim=True).sqrt()
        return (img @ txt.T) * self.logit_scale.float().exp()

    def __call__(self, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        return self.logits(self.get_image_features(pixel_values), self.get_text_features(input_ids))


def _walk(obj):
    """obj and every module below it (attributes and lists, as get_state_dict walks them)."""
    yield obj
    for value in vars(obj).values():
        for item in (value if isinstance(value, list) else [value]):
            if hasattr(item, "__dict__") and not isinstance(item, (Tensor, type)) and type(item).__module__ == __name__:
                yield from _walk(item)

