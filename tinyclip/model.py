"""CLIP as a tree of plain tinygrad modules.

Attribute names mirror the keys of a Hugging Face CLIPModel checkpoint
(`text_model.encoder.layers.0.self_attn.q_proj.weight`,
`vision_model.pre_layrnorm.weight`, `logit_scale`, ...), so
`tinygrad.nn.state.get_state_dict(model)` lists exactly the parameters a
checkpoint must provide and loading is a strict key/shape check plus a copy.

Every module takes and returns tinygrad Tensors and stays on their device.
Parameters are created empty; `tinyclip.weights.load_weights` fills them, then
`CLIPModel.prepare()` lets the kernel set store the linear weights its way.
The hot operations (linear layers, attention, layer norm) go through the
model's kernel set (tinyclip.kernels), which the backend chooses: the model
itself never asks which device it is on. LayerNorm and softmax always compute
in float32, whatever the weights' dtype, as OpenAI's and open_clip's float16
inference does. A kernel set with a linear dtype (bfloat16) computes the linear
layers in it, except the final projections, which stay in the model's dtype.
"""
from __future__ import annotations

import dataclasses

from tinygrad import Tensor, dtypes
from tinygrad.dtype import DType

from . import _tinygrad, interpolate
from .config import RESNET_STRIDE, CLIPConfig, CLIPTextConfig, CLIPVisionConfig, ResNetVisionConfig
from .kernels import TINYGRAD, KernelSet, activation


# The two towers by the top-level attributes (state-dict key prefixes) that hold their parameters; logit_scale
# belongs to neither. tinyclip/towers.py reads each tower's weights on the tower's first use.
TOWERS = {"text": ("text_model", "text_projection"), "image": ("vision_model", "visual_projection", "visual")}


def tower_of(key: str) -> str | None:
    """The tower ("text" or "image") whose parameter the state-dict key names; None for logit_scale."""
    first = key.split(".", 1)[0]
    return next((tower for tower, names in TOWERS.items() if first in names), None)


def _param(shape: tuple[int, ...], dtype: DType, device: str) -> Tensor:
    return _tinygrad.empty(shape, dtype, device)


class Linear:
    """y = x @ weight.T + bias. `weight` is (out, in) as in the checkpoint, until prepare() lets the
    kernel set store it its own way (the CPU set: panels)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: DType, device: str,
                 kernels: KernelSet):
        self.weight = _param((out_features, in_features), dtype, device)
        self.bias = _param((out_features,), dtype, device) if bias else None
        self.kernels = kernels

    def __call__(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """The layer, then the activation `act` (a config hidden_act name) when given, then + residual
        when given; a kernel set may compute all three in one kernel."""
        return self.kernels.linear(x, self.weight, self.bias, act, residual)

    @property
    def dense_weight(self) -> Tensor:
        """The weight as the checkpoint has it, (out, in), however the kernel set stores it."""
        return self.kernels.dense_weight(self.weight)

    def prepare(self) -> None:
        self.weight = self.kernels.prepare_linear(self.weight)


class LayerNorm:
    """Over the last axis, in float32 whatever the weights' dtype."""

    def __init__(self, dim: int, eps: float, dtype: DType, device: str, kernels: KernelSet):
        self.weight, self.bias, self.eps = _param((dim,), dtype, device), _param((dim,), dtype, device), eps
        self.kernels = kernels

    def __call__(self, x: Tensor) -> Tensor:
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)


class Embedding:
    """A table of rows (num, dim), looked up by the kernel set (embed_tokens) or read whole."""

    def __init__(self, num: int, dim: int, dtype: DType, device: str):
        self.weight = _param((num, dim), dtype, device)


class CLIPAttention:
    def __init__(self, hidden: int, heads: int, dtype: DType, device: str, kernels: KernelSet):
        self.num_heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            Linear(hidden, hidden, True, dtype, device, kernels) for _ in range(4))
        self.kernels = kernels

    def __call__(self, x: Tensor, causal: bool, residual: Tensor | None = None) -> Tensor:
        """Self-attention over x (`causal`: each position over itself and those before), plus `residual`
        when given (added by out_proj)."""
        out = self.kernels.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, causal)
        return self.out_proj(out, residual=residual)                                    # (B, T, C)


class CLIPMLP:
    def __init__(self, hidden: int, intermediate: int, act: str, dtype: DType, device: str, kernels: KernelSet):
        activation(act)   # an unknown name fails here, not at the first call
        self.act = act
        self.fc1 = Linear(hidden, intermediate, True, dtype, device, kernels)
        self.fc2 = Linear(intermediate, hidden, True, dtype, device, kernels)

    def __call__(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.fc2(self.fc1(x, act=self.act), residual=residual)


class CLIPEncoderLayer:
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, dtype: DType, device: str, kernels: KernelSet):
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads, dtype, device, kernels)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device, kernels)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dtype, device, kernels)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device, kernels)

    def __call__(self, x: Tensor, causal: bool) -> Tensor:
        x = self.self_attn(self.layer_norm1(x), causal, residual=x)    # x + attention(norm(x))
        return self.mlp(self.layer_norm2(x), residual=x)               # x + mlp(norm(x))


class CLIPEncoder:
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, dtype: DType, device: str, kernels: KernelSet):
        self.layers = [CLIPEncoderLayer(cfg, dtype, device, kernels) for _ in range(cfg.num_hidden_layers)]

    def __call__(self, x: Tensor, causal: bool = False) -> Tensor:
        for layer in self.layers:
            x = layer(x, causal)
        return x


class CLIPTextEmbeddings:
    def __init__(self, cfg: CLIPTextConfig, dtype: DType, device: str, kernels: KernelSet):
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype, device)
        self.kernels = kernels

    def __call__(self, input_ids: Tensor) -> Tensor:
        return self.kernels.embed_tokens(input_ids, self.token_embedding.weight, self.position_embedding.weight)


class CLIPTextTransformer:
    def __init__(self, cfg: CLIPTextConfig, dtype: DType, device: str, kernels: KernelSet):
        self.config = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, dtype, device, kernels)
        self.encoder = CLIPEncoder(cfg, dtype, device, kernels)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device, kernels)
        self.kernels = kernels

    def __call__(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, hidden) pooled states, before the projection. The final norm runs on the
        pooled rows only: it is per row, so that is the same numbers as pooling the normed states."""
        x = self.encoder(self.embeddings(input_ids), causal=True)                     # (B, T, hidden)
        return self.final_layer_norm(self.kernels.pool_text(x, input_ids, self.config.eos_token_id))


class CLIPVisionEmbeddings:
    def __init__(self, cfg: CLIPVisionConfig, dtype: DType, device: str, kernels: KernelSet):
        self.patch_size, self.image_size = cfg.patch_size, cfg.image_size
        n_pos = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = _param((cfg.hidden_size,), dtype, device)
        self.patch_embedding = Conv2dPatch(cfg.num_channels, cfg.hidden_size, cfg.patch_size, dtype, device, kernels)
        self.position_embedding = Embedding(n_pos, cfg.hidden_size, dtype, device)
        self.kernels = kernels

    def __call__(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values)                                  # (B, g*g, hidden)
        return self.kernels.class_and_positions(patches, self.class_embedding,
                                                self.position_embedding.weight)      # (B, g*g+1, hidden)


class Conv2dPatch:
    """A Conv2d whose stride equals its kernel and has no bias (weight (out, C, p, p)),
    computed as one matmul over the non-overlapping patches: same sums, faster kernels.
    prepare() hands the weight, as an (out, C*p*p) matrix, to the kernel set like a Linear's."""

    def __init__(self, channels: int, hidden: int, patch: int, dtype: DType, device: str, kernels: KernelSet):
        self.weight = _param((hidden, channels, patch, patch), dtype, device)
        self.patch, self.kernels = patch, kernels

    def __call__(self, x: Tensor) -> Tensor:
        x = self.kernels.patches(x, self.patch)                                       # (B, gh*gw, C*p*p)
        weight = self.weight.reshape(self.weight.shape[0], -1) if self.weight.ndim == 4 else self.weight   # not prepared
        return self.kernels.linear(x, weight, None)                                   # (B, gh*gw, hidden)

    def prepare(self) -> None:
        if self.weight.ndim == 4:
            self.weight = self.kernels.prepare_linear(self.weight.reshape(self.weight.shape[0], -1))


class CLIPVisionTransformer:
    def __init__(self, cfg: CLIPVisionConfig, dtype: DType, device: str, kernels: KernelSet):
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg, dtype, device, kernels)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device, kernels)   # sic: HF's key
        self.encoder = CLIPEncoder(cfg, dtype, device, kernels)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype, device, kernels)
        self.kernels = kernels

    def __call__(self, pixel_values: Tensor) -> Tensor:
        """(B, C, S, S) pixels -> (B, hidden) pooled class-token states, before the projection."""
        x = self.pre_layrnorm(self.embeddings(pixel_values.cast(self.embeddings.class_embedding.dtype)))
        return self.post_layernorm(self.kernels.class_token(self.encoder(x)))


class Conv2d:
    """A square convolution with a bias: the checkpoint's bias-free convolution with its batch norm
    folded in at load (eval-mode batch norm is per-channel affine). `weight` (out, in, k, k) until
    prepare() lets the kernel set store it its way."""

    def __init__(self, cin: int, cout: int, kernel: int, dtype: DType, device: str, kernels: KernelSet,
                 stride: int = 1, padding: int = 0):
        self.weight = _param((cout, cin, kernel, kernel), dtype, device)
        self.bias = _param((cout,), dtype, device)
        self.kernel, self.stride, self.padding, self.kernels = kernel, stride, padding, kernels

    def __call__(self, x: Tensor, act: str | None = None) -> Tensor:
        return self.kernels.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.kernel, act)

    def prepare(self) -> None:
        self.weight = self.kernels.prepare_conv2d(self.weight)


def _avg_pool(x: Tensor, k: int) -> Tensor:
    """torch's AvgPool2d(k): k x k windows at stride k, a ragged edge dropped."""
    return x if k == 1 else x.avg_pool2d(kernel_size=(k, k), stride=k)


class Bottleneck:
    """open_clip's ModifiedResNet block: 1x1, 3x3, (average pool where strided), 1x1 four times wider;
    the shortcut average-pools then projects where the shape changes (anti-aliased strides)."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dtype: DType, device: str, kernels: KernelSet):
        out = planes * self.expansion
        self.conv1 = Conv2d(inplanes, planes, 1, dtype, device, kernels)
        self.conv2 = Conv2d(planes, planes, 3, dtype, device, kernels, padding=1)
        self.conv3 = Conv2d(planes, out, 1, dtype, device, kernels)
        self.downsample = Conv2d(inplanes, out, 1, dtype, device, kernels) if stride > 1 or inplanes != out else None
        self.stride = stride

    def __call__(self, x: Tensor) -> Tensor:
        y = self.conv3(_avg_pool(self.conv2(self.conv1(x, "relu"), "relu"), self.stride))
        shortcut = x if self.downsample is None else self.downsample(_avg_pool(x, self.stride))
        return (y + shortcut).relu()


class AttentionPool2d:
    """Attention pooling: the mean of the grid attends (with the grid) over the grid, one query kept."""

    def __init__(self, grid: int, width: int, heads: int, out: int, dtype: DType, device: str, kernels: KernelSet):
        self.positional_embedding = _param((grid * grid + 1, width), dtype, device)
        self.q_proj, self.k_proj, self.v_proj = (Linear(width, width, True, dtype, device, kernels) for _ in range(3))
        self.c_proj = Linear(width, out, True, dtype, device, kernels.without_linear_dtype())   # the embedding: exact
        self.num_heads, self.kernels = heads, kernels

    def __call__(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W).permute(0, 2, 1)                                     # (B, HW, C)
        mean = x.float().mean(1, keepdim=True).cast(x.dtype)                             # (B, 1, C)
        x = mean.cat(x, dim=1) + self.positional_embedding                               # (B, HW+1, C)
        out = self.kernels.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.c_proj(out[:, 0])                                                    # (B, out)


class ModifiedResNet:
    """OpenAI's ResNet image tower (open_clip's `ModifiedResNet`; attribute names are its keys, the
    batch norms folded into the convolutions): a three-convolution stem, four stages of bottlenecks,
    attention pooling straight to the embedding (no separate projection)."""

    def __init__(self, cfg: ResNetVisionConfig, out: int, dtype: DType, device: str, kernels: KernelSet):
        self.config, w = cfg, cfg.width
        self.conv1 = Conv2d(cfg.num_channels, w // 2, 3, dtype, device, kernels, stride=2, padding=1)
        self.conv2 = Conv2d(w // 2, w // 2, 3, dtype, device, kernels, padding=1)
        self.conv3 = Conv2d(w // 2, w, 3, dtype, device, kernels, padding=1)
        inplanes = w
        for i, blocks in enumerate(cfg.layers):
            planes = w * 2 ** i
            stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2, dtype, device, kernels)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, 1, dtype, device, kernels) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", stage)
        self.attnpool = AttentionPool2d(cfg.image_size // RESNET_STRIDE, cfg.embed_dim, cfg.heads, out, dtype, device,
                                        kernels)

    def __call__(self, pixel_values: Tensor) -> Tensor:
        """(B, C, S, S) pixels -> (B, projection_dim) image features."""
        x = pixel_values.cast(self.conv1.bias.dtype)
        x = _avg_pool(self.conv3(self.conv2(self.conv1(x, "relu"), "relu"), "relu"), 2)     # (B, w, S/4, S/4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.attnpool(x)                                                          # (B, out)


class CLIPModel:
    """The whole CLIPModel: `get_image_features`, `get_text_features` and `__call__`
    (logits_per_image) with transformers' names and semantics. `kernels` computes the hot
    operations (tinyclip.kernels; the backend chooses it, the plain tinygrad set by default)."""

    def __init__(self, config: CLIPConfig, dtype: DType = dtypes.float32, device: str = "CPU",
                 kernels: KernelSet = TINYGRAD):
        self.config, self.kernels = config, kernels
        self.text_model = CLIPTextTransformer(config.text_config, dtype, device, kernels)
        if isinstance(config.vision_config, ResNetVisionConfig):
            # open_clip's names: the tower pools straight to projection_dim
            self.visual = ModifiedResNet(config.vision_config, config.projection_dim, dtype, device, kernels)
        else:
            self.vision_model = CLIPVisionTransformer(config.vision_config, dtype, device, kernels)
            self.visual_projection = Linear(config.vision_config.hidden_size, config.projection_dim, False, dtype,
                                            device, kernels.without_linear_dtype())
        self.text_projection = Linear(config.text_config.hidden_size, config.projection_dim, False, dtype, device,
                                      kernels.without_linear_dtype())
        self.logit_scale = _param((), dtype, device)

    def resize_images(self, image_size: int) -> None:
        """After the image tower's weights are read: run a ViT at image_size x image_size (a multiple of
        the patch size; config.requested_image_size). The position embeddings are interpolated once here, as
        transformers' interpolate_pos_encoding=True does on every call (tinyclip/interpolate.py)."""
        v, embeddings = self.config.vision_config, self.vision_model.embeddings
        weight = embeddings.position_embedding.weight
        resized = interpolate.position_embeddings(weight.float().numpy(), image_size, v.patch_size)
        embeddings.position_embedding.weight = _tinygrad.from_numpy(
            resized.astype(_tinygrad.numpy_dtype(weight.dtype)), weight.device)
        self.config = dataclasses.replace(self.config, vision_config=dataclasses.replace(v, image_size=image_size))
        self.vision_model.config = self.config.vision_config
        embeddings.image_size = image_size

    def prepare(self, tower: str | None = None) -> None:
        """After loading: let the kernel set store every linear weight its way (once); those of one tower
        ("text" or "image", TOWERS) when given."""
        roots = [self] if tower is None else [getattr(self, name) for name in TOWERS[tower] if hasattr(self, name)]
        for root in roots:
            for layer in walk(root):
                if isinstance(layer, (Linear, Conv2dPatch, Conv2d)):
                    layer.prepare()

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, projection_dim), projected and not normalised."""
        if isinstance(self.config.vision_config, ResNetVisionConfig):
            return self.visual(pixel_values)
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


def walk(obj):
    """obj and every module below it (attributes and lists, as get_state_dict walks them)."""
    yield obj
    for value in vars(obj).values():
        for item in (value if isinstance(value, list) else [value]):
            if hasattr(item, "__dict__") and not isinstance(item, (Tensor, type)) and type(item).__module__ == __name__:
                yield from walk(item)
