"""CLIP configuration read from a Hugging Face config.json.

Field names are transformers' own (CLIPTextConfig, CLIPVisionConfig,
CLIPConfig), so a config.json maps onto these dataclasses key for key. The
defaults are transformers' defaults (the ViT-B/32 shape), used only where
config.json leaves a field out, exactly as transformers does.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass, field

from .errors import ConfigError, UsageError
from .jsonfile import read_json

# Activations tinyclip implements; kernels/activations.py maps each name to its function.
# "gelu" is the exact erf GELU, "gelu_new"/"gelu_pytorch_tanh" the tanh one.
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
# The model is built before its weights are read, and each layer costs ~6 ms and a few kB of
# Python objects even unrealized: a corrupt count of millions would hang. The largest CLIPs have 48.
MAX_LAYERS = 256


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77          # the context length
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407                  # 2 in legacy configs: pool at argmax(ids)


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class ResNetVisionConfig:
    """OpenAI's ModifiedResNet image tower (RN50, RN101, RN50x4, RN50x16, RN50x64), which transformers
    does not implement; open_clip's vision_cfg with `layers` a list. Names are open_clip's."""
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)   # bottleneck blocks per stage
    width: int = 64                  # the stem's output channels; stage i has width * 2**i planes
    heads: int = 32                  # attention-pool heads: width * 32 // head_width
    image_size: int = 224            # a multiple of 32 (the tower downsamples by 32)
    num_channels: int = 3
    batch_norm_eps: float = 1e-5     # torch's nn.BatchNorm2d default, folded into the convolutions at load

    @property
    def embed_dim(self) -> int:
        """The attention pool's width: the last stage's output channels."""
        return self.width * 32


RESNET_STRIDE = 32


@dataclass
class CLIPConfig:
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig | ResNetVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "CLIPConfig":
        """Build a config from config.json's contents.

        The legacy `text_config_dict` / `vision_config_dict` keys override
        `text_config` / `vision_config` key by key, as transformers does.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "clip")
        if model_type != "clip":
            raise ConfigError(f"{source}: model_type is {model_type!r}; tinyclip loads CLIPModel checkpoints "
                              "(model_type 'clip')")
        text = _merge(d, "text_config", "text_config_dict", source)
        vision = _merge(d, "vision_config", "vision_config_dict", source)
        top = _fields(cls, d, source, "")
        cfg = cls(text_config=_fields(CLIPTextConfig, text, source, "text_config."),
                  vision_config=_fields(CLIPVisionConfig, vision, source, "vision_config."),
                  projection_dim=top.projection_dim, logit_scale_init_value=top.logit_scale_init_value)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "CLIPConfig":
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; a CLIP checkpoint folder needs the config.json that "
                              "transformers' save_pretrained writes")
        return cls.from_dict(read_json(path, ConfigError), str(path))

    def validate(self, source: str = "config.json") -> None:
        v = self.vision_config
        if isinstance(v, ResNetVisionConfig):
            _validate_resnet(v, source)
        towers = [("text_config.", self.text_config)] + [("vision_config.", v)] * isinstance(v, CLIPVisionConfig)
        for prefix, sub in towers:
            if sub.hidden_act not in ACTIVATIONS:
                raise ConfigError(f"{source}: {prefix}hidden_act is {sub.hidden_act!r}; tinyclip supports "
                                  f"{', '.join(ACTIVATIONS)}")
            if sub.hidden_size % sub.num_attention_heads:
                raise ConfigError(f"{source}: {prefix}hidden_size {sub.hidden_size} is not a multiple of "
                                  f"num_attention_heads {sub.num_attention_heads}")
            if not 0 < sub.layer_norm_eps < math.inf:
                raise ConfigError(f"{source}: {prefix}layer_norm_eps must be a finite number > 0, "
                                  f"got {sub.layer_norm_eps}")
            if sub.num_hidden_layers > MAX_LAYERS:
                raise ConfigError(f"{source}: {prefix}num_hidden_layers is {sub.num_hidden_layers}; tinyclip "
                                  f"builds at most {MAX_LAYERS} (the largest CLIP models have 48): the file is "
                                  "corrupt or not a CLIP config")
        if isinstance(v, CLIPVisionConfig) and v.image_size % v.patch_size:
            raise ConfigError(f"{source}: vision_config.image_size {v.image_size} is not a multiple of "
                              f"patch_size {v.patch_size}")


def _validate_resnet(v: ResNetVisionConfig, source: str) -> None:
    if len(v.layers) != 4 or sum(v.layers) > MAX_LAYERS:
        raise ConfigError(f"{source}: vision_cfg.layers is {list(v.layers)}; a ModifiedResNet has 4 stages of at "
                          f"most {MAX_LAYERS} blocks in all")
    if v.embed_dim % v.heads:
        raise ConfigError(f"{source}: the ResNet's attention pool is width * 32 = {v.embed_dim} wide, not a multiple "
                          f"of its {v.heads} heads (width * 32 // head_width); torch's attention refuses it too")
    if v.image_size % RESNET_STRIDE:
        raise ConfigError(f"{source}: vision_cfg.image_size {v.image_size} is not a multiple of {RESNET_STRIDE}, "
                          "the ResNet's downsampling; its attention pool's positions would not fit the grid")


def requested_image_size(vision: CLIPVisionConfig | ResNetVisionConfig, image_size) -> int:
    """`image_size` (load's argument), checked: a positive multiple of the patch size; the error names
    the nearest sizes that work."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise UsageError(f"image_size must be a positive integer, got {image_size!r}")
    if isinstance(vision, ResNetVisionConfig):
        if image_size != vision.image_size:
            raise UsageError(f"image_size {image_size}: this checkpoint's ResNet image tower runs at its own size, "
                             f"{vision.image_size}; interpolation is implemented for ViT towers")
        return image_size
    step = vision.patch_size
    if image_size % step:
        below, above = image_size // step * step, (image_size // step + 1) * step
        nearest = f"{below} or {above}" if below else f"{above}"
        raise UsageError(f"image_size {image_size} is not a multiple of the patch size {step}; the nearest sizes "
                         f"that work are {nearest}")
    return image_size


def _merge(d: dict, key: str, legacy_key: str, source: str) -> dict:
    merged = {}
    for k in (key, legacy_key):
        sub = d.get(k)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: {k} must be a JSON object, got {type(sub).__name__}")
        merged.update(sub)
    return merged


def _fields(cls, d: dict, source: str, prefix: str):
    """Take the fields `cls` knows from `d`, type-checked; ignore the rest
    (transformers writes many keys, such as dropout, that inference does not use)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d or f.name.endswith("_config") or d[f.name] is None:
            continue
        value, want = d[f.name], f.type
        if f.name == "eos_token_id" and isinstance(value, list):
            value = value[0] if value else None   # transformers allows a list; pooling uses the first
        if want in ("int", int) and isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]                      # image_size / patch_size may be written as a square pair
        ok = (isinstance(value, int) and not isinstance(value, bool)) if want in ("int", int) else \
             (isinstance(value, (int, float)) and not isinstance(value, bool)) if want in ("float", float) else \
             isinstance(value, str)
        if not ok:
            raise ConfigError(f"{source}: {prefix}{f.name} must be {want}, got {value!r}")
        if want in ("int", int) and value <= 0 and f.name not in ("pad_token_id", "bos_token_id", "eos_token_id"):
            raise ConfigError(f"{source}: {prefix}{f.name} must be positive, got {value}")
        kwargs[f.name] = float(value) if want in ("float", float) else value
    return cls(**kwargs)
