"""open_clip's model config (`open_clip_config.json`) in tinyclip's terms.

open_clip's ViT CLIPs compute what transformers' CLIPModel computes, under
other names and layouts, so they are expressed here as a tinyclip
`CLIPConfig` and a map from tinyclip's parameter names to open_clip's keys:

- each block's fused `attn.in_proj_weight` (3C, C) is q, k and v stacked, in
  rows [0:C], [C:2C], [2C:3C] (torch's nn.MultiheadAttention);
- `visual.proj` and `text_projection` are (width, embed), used as `x @ proj`:
  transformers' projection weights are their transposes;
- text pooling takes the argmax of the ids (open_clip's default
  `pool_type='argmax'`), transformers' legacy rule for `eos_token_id == 2`.

Every config field that changes the computation and that tinyclip's model
does not implement is refused by name (`_REQUIRED`); fields that only matter
for training are accepted (`_INERT`); any other field is refused too, since
its effect is unknown. Nothing here converts files on disk or unpickles.
Reference: open_clip 3.3.0, `model.py` (CLIPVisionCfg, CLIPTextCfg, CLIP),
`transformer.py` (VisionTransformer, TextTransformer, text_global_pool).
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass

from ... import pooling
from ...config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, ResNetVisionConfig
from ...errors import ConfigError, TokenizerError
from ...jsonfile import read_json

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
PICKLE_FILE = "open_clip_pytorch_model.bin"
LAYER_NORM_EPS = 1e-5          # torch's nn.LayerNorm default, which open_clip's LayerNorm keeps
# open_clip's default text pooling is at argmax(ids) (its end token, 49407, is the largest id);
# tinyclip's model, like transformers, pools that way for the legacy eos_token_id 2.
ARGMAX_POOLING = pooling.LEGACY_EOS

# field -> the only value(s) tinyclip computes correctly, and what the field would change. First the
# transformer-block settings either tower may carry, then each tower's own.
_BLOCK_REQUIRED = {
    "ls_init_value": ((None,), "layer scale"),
    "output_tokens": ((False,), "token outputs"),
    "act_kwargs": ((None, {}), "activation arguments"),
    "norm_kwargs": ((None, {}), "layer-norm arguments"),
    "block_type": ((None, "default"), "custom attention blocks"),
    "qk_norm": ((False,), "q/k layer norms"),
    "scaled_cosine_attn": ((False,), "scaled cosine attention"),
    "scale_heads": ((False,), "per-head attention scales"),
    "scale_attn_inner": ((False,), "an inner attention layer norm"),
    "scale_attn": ((False,), "a post-attention layer norm"),
    "scale_fc": ((False,), "an MLP layer norm"),
}
_VISION_REQUIRED = {
    **_BLOCK_REQUIRED,
    "attentional_pool": ((False,), "an attentional pooler"),
    "no_ln_pre": ((False,), "no ln_pre before the transformer"),
    "pos_embed_type": (("learnable",), "a fixed sin-cos position embedding"),
    "pool_type": (("tok",), "pooling other than the class token"),
    "timm_model_name": ((None, ""), "a timm image trunk"),
    "input_patchnorm": ((False,), "patch layer norm"),
    "global_average_pool": ((False,), "average pooling"),
    "image_seq_len": ((None,), "variable-resolution (NaFlex) input"),
}
_VISION_INERT = ("layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                 # a class token is pooled, so a layer norm before or after pooling is the same
                 "final_ln_after_pool",
                 # only read with attentional_pool / timm_model_name, both refused
                 "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool", "timm_proj",
                 "timm_proj_bias", "timm_drop", "timm_drop_path", "timm_model_kwargs")
_TEXT_REQUIRED = {
    **_BLOCK_REQUIRED,
    "hf_model_name": ((None, ""), "a Hugging Face text tower"),
    "embed_cls": ((False,), "a text class token"),
    "no_causal_mask": ((False,), "attention without the causal mask"),
    "pool_type": (("argmax", "eos"), "pooling other than at the end token"),
    "proj_bias": ((False,), "a text projection bias"),
    "proj_type": (("linear",), "a text projection other than linear"),
    "text_arch": (("clip",), "another text architecture"),
    "variable_text": ((False,), "variable-length text"),
    "tokenizer_mode": ((None,), "a Hugging Face tokenizer mode"),
    "tokenizer_type": ((None, ""), "another tokenizer"),
}
_TEXT_INERT = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "eos_id",
               "tokenizer_kwargs",   # checked by tokenizer_clean
               "hf_tokenizer_name",  # refused with its own message where set
               "final_ln_after_pool",   # one pooled token: layer norm before or after pooling is the same
               "pad_id",                # only read with embed_cls (refused); the tokenizer pads with 0
               "hf_model_pretrained", "hf_proj_type", "hf_pooler_type")
_TOP_REQUIRED = {
    "init_logit_bias": ((None,), "a logit bias (SigLIP-style models)"),
    "multimodal_cfg": ((None,), "a CoCa text decoder"),
}
_TOP_INERT = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
              "nonscalar_logit_scale", "cast_dtype", "output_dict")
TOKENIZER_CLEAN = ("lower",)   # open_clip's default; 'whitespace' and 'canonicalize' keep case or drop punctuation


@dataclass
class OpenClipSpec:
    """What an open_clip_config.json says, in tinyclip's terms."""

    config: CLIPConfig
    preprocess: dict          # open_clip's preprocess_cfg, with size from the vision tower


def read_config(folder: pathlib.Path) -> OpenClipSpec:
    """Read `open_clip_config.json` of `folder` into an `OpenClipSpec`; refuse what tinyclip cannot run."""
    path = folder / CONFIG_FILE
    d = read_json(path, ConfigError)
    if not isinstance(d, dict) or not isinstance(d.get("model_cfg"), dict):
        raise ConfigError(f"{path}: needs a 'model_cfg' object (open_clip's model config), as open_clip's "
                          "push_to_hf_hub writes it")
    return spec_from_dict(d["model_cfg"], d.get("preprocess_cfg") or {}, str(path))


def spec_from_dict(model_cfg: dict, preprocess_cfg: dict, source: str = CONFIG_FILE) -> OpenClipSpec:
    """An `OpenClipSpec` from open_clip's `model_cfg` (as in its model_configs/*.json) and `preprocess_cfg`."""
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    for name, sub in (("vision_cfg", vision), ("text_cfg", text)):
        if not isinstance(sub, dict):
            raise ConfigError(f"{source}: model_cfg.{name} must be an object, got {type(sub).__name__}")
    _check(model_cfg, _TOP_REQUIRED, _TOP_INERT, source, "model_cfg.")
    _check(vision, _VISION_REQUIRED, _VISION_INERT, source, "model_cfg.vision_cfg.")
    _check(text, _TEXT_REQUIRED, _TEXT_INERT, source, "model_cfg.text_cfg.")
    name = text.get("hf_tokenizer_name")
    if name not in (None, ""):
        raise TokenizerError(f"{source}: model_cfg.text_cfg.hf_tokenizer_name is {name!r}, a Hugging Face "
                             "tokenizer that tinyclip cannot read: it implements CLIP's BPE tokenizer only")
    tokenizer_clean(text, source)
    quick = model_cfg.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise ConfigError(f"{source}: model_cfg.quick_gelu must be true or false, got {quick!r}")
    act = "quick_gelu" if quick else "gelu"    # open_clip: QuickGELU, else torch's exact (erf) nn.GELU

    resnet = isinstance(vision.get("layers", 12), (list, tuple))    # OpenAI's RN50 and kin
    vision_config = _resnet(vision, source) if resnet else _vit(vision, act, source)
    image_size = vision_config.image_size

    text_width = _int(text, "width", 512, source, "text_cfg")
    context_length = _int(text, "context_length", 77, source, "text_cfg")
    # 'argmax' pools at the largest id (the end token is the largest); 'eos' at the first eos_id.
    eos = ARGMAX_POOLING
    if text.get("pool_type", "argmax") == "eos":
        eos = _int(text, "eos_id", 2, source, "text_cfg")
        if eos == ARGMAX_POOLING:
            raise ConfigError(f"{source}: model_cfg.text_cfg pools at eos_id 2, which tinyclip cannot tell "
                              "from argmax pooling (transformers' legacy rule for eos id 2)")
    text_config = CLIPTextConfig(
        vocab_size=_int(text, "vocab_size", 49408, source, "text_cfg"), hidden_size=text_width,
        intermediate_size=_mlp_width(text, text_width, source, "text_cfg"),
        num_hidden_layers=_int(text, "layers", 12, source, "text_cfg"),
        num_attention_heads=_int(text, "heads", 8, source, "text_cfg"),
        max_position_embeddings=context_length, hidden_act=act, layer_norm_eps=LAYER_NORM_EPS,
        eos_token_id=eos)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config,
                        projection_dim=_int(model_cfg, "embed_dim", None, source, ""))
    config.validate(source)
    if not isinstance(preprocess_cfg, dict):
        raise ConfigError(f"{source}: preprocess_cfg must be an object, got {type(preprocess_cfg).__name__}")
    # open_clip's create_model sets the preprocessing size from the vision tower, whatever the file says.
    preprocess = {**preprocess_cfg, "size": image_size}
    return OpenClipSpec(config, preprocess)


def _vit(vision: dict, act: str, source: str) -> CLIPVisionConfig:
    """open_clip's VisionTransformer as transformers' CLIPVisionConfig."""
    width = _int(vision, "width", 768, source, "vision_cfg")
    head_width = _int(vision, "head_width", 64, source, "vision_cfg")
    if width % head_width:
        raise ConfigError(f"{source}: model_cfg.vision_cfg.width {width} is not a multiple of head_width "
                          f"{head_width}")
    image_size = _square(vision, "image_size", 224, source)
    patch_size = _square(vision, "patch_size", 16, source)
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=_mlp_width(vision, width, source, "vision_cfg"),
        num_hidden_layers=_int(vision, "layers", 12, source, "vision_cfg"), num_attention_heads=width // head_width,
        image_size=image_size, patch_size=patch_size, hidden_act=act, layer_norm_eps=LAYER_NORM_EPS)


def _resnet(vision: dict, source: str) -> ResNetVisionConfig:
    """open_clip's ModifiedResNet (vision_cfg.layers a list): model.py's `_build_vision_tower` gives it
    width * 32 // head_width attention-pool heads and the model's embed_dim as its output."""
    layers = vision["layers"]
    if len(layers) != 4 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in layers):
        raise ConfigError(f"{source}: model_cfg.vision_cfg.layers must be 4 positive integers (blocks per ResNet "
                          f"stage), got {layers!r}")
    width = _int(vision, "width", 64, source, "vision_cfg")
    head_width = _int(vision, "head_width", 64, source, "vision_cfg")
    heads = width * 32 // head_width
    if heads == 0:
        raise ConfigError(f"{source}: model_cfg.vision_cfg.head_width {head_width} exceeds the attention pool's "
                          f"width {width * 32}")
    return ResNetVisionConfig(layers=tuple(layers), width=width, heads=heads,
                              image_size=_square(vision, "image_size", 224, source))


def tokenizer_clean(model_cfg_text: dict, source: str) -> str:
    """The cleaning mode of open_clip's SimpleTokenizer for this text config."""
    kwargs = model_cfg_text.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ConfigError(f"{source}: model_cfg.text_cfg.tokenizer_kwargs must be an object")
    unknown = sorted(set(kwargs) - {"clean"})
    if unknown:
        raise ConfigError(f"{source}: model_cfg.text_cfg.tokenizer_kwargs sets {', '.join(unknown)}, which "
                          "tinyclip's open_clip tokenizer does not implement")
    clean = kwargs.get("clean", "lower")
    if clean not in TOKENIZER_CLEAN:
        raise ConfigError(f"{source}: model_cfg.text_cfg.tokenizer_kwargs.clean is {clean!r}; tinyclip implements "
                          f"open_clip's {', '.join(map(repr, TOKENIZER_CLEAN))} cleaning")
    return clean


def _check(d: dict, required: dict, inert: tuple, source: str, prefix: str) -> None:
    for key, value in d.items():
        if key in required:
            allowed, what = required[key]
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise ConfigError(f"{source}: {prefix}{key} is {value!r}, which asks for {what}; tinyclip runs "
                                  f"open_clip's plain ViT CLIP and does not implement it (supported: "
                                  f"{' or '.join(map(repr, allowed))})")
        elif key not in inert:
            raise ConfigError(f"{source}: {prefix}{key} is not an open_clip setting tinyclip knows; it may change "
                              "the computation, so the checkpoint is refused rather than run differently")


def _int(d: dict, key: str, default, source: str, where: str) -> int:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: model_cfg.{where + '.' if where else ''}{key} must be a positive integer, "
                          f"got {value!r}")
    return value


def _square(d: dict, key: str, default: int, source: str) -> int:
    value = d.get(key, default)
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: model_cfg.vision_cfg.{key} is {list(value)}; tinyclip runs square "
                          "images and patches")
    return _int({key: value}, key, default, source, "vision_cfg")


MAX_MLP_WIDTH = 1 << 24    # an MLP wider than this is a broken config, not a model


def _mlp_width(d: dict, width: int, source: str, where: str) -> int:
    ratio = d.get("mlp_ratio", 4.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
        raise ConfigError(f"{source}: model_cfg.{where}.mlp_ratio must be a positive number, got {ratio!r}")
    mlp_width = width * ratio
    if not mlp_width < MAX_MLP_WIDTH:     # 1e308 would overflow int(); a billion-wide layer is not a CLIP
        raise ConfigError(f"{source}: model_cfg.{where}.mlp_ratio {ratio!r} makes an MLP {mlp_width:.3g} wide (width "
                          f"{width}); open_clip checkpoints use ratios near 4")
    return int(mlp_width)    # open_clip's ResidualAttentionBlock: mlp_width = int(d_model * mlp_ratio)


