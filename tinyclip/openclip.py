"""open_clip checkpoints (`open_clip_config.json` + `open_clip_model.safetensors`), read directly.

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

from tinygrad.nn.state import get_state_dict

from . import pooling, weights
from .config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from .errors import CheckpointError, ConfigError
from .jsonfile import read_json

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
    "hf_tokenizer_name": ((None, ""), "a Hugging Face tokenizer"),
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
               "tokenizer_kwargs",   # checked by tokenizer_settings
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


def is_openclip_folder(folder: pathlib.Path) -> bool:
    """True for an open_clip checkpoint folder: its config and no transformers config.json
    (a repository that has both is read as the transformers checkpoint, as before)."""
    return (folder / CONFIG_FILE).is_file() and not (folder / "config.json").is_file()


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
    tokenizer_clean(text, source)
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise ConfigError(f"{source}: model_cfg.vision_cfg.layers is a list: a ModifiedResNet image tower "
                          "(RN50 and kin), which tinyclip does not implement; it runs ViT CLIPs")
    quick = model_cfg.get("quick_gelu", False)
    if not isinstance(quick, bool):
        raise ConfigError(f"{source}: model_cfg.quick_gelu must be true or false, got {quick!r}")
    act = "quick_gelu" if quick else "gelu"    # open_clip: QuickGELU, else torch's exact (erf) nn.GELU

    width = _int(vision, "width", 768, source, "vision_cfg")
    head_width = _int(vision, "head_width", 64, source, "vision_cfg")
    if width % head_width:
        raise ConfigError(f"{source}: model_cfg.vision_cfg.width {width} is not a multiple of head_width "
                          f"{head_width}")
    image_size = _square(vision, "image_size", 224, source)
    patch_size = _square(vision, "patch_size", 16, source)
    vision_config = CLIPVisionConfig(
        hidden_size=width, intermediate_size=_mlp_width(vision, width, source, "vision_cfg"),
        num_hidden_layers=_int(vision, "layers", 12, source, "vision_cfg"), num_attention_heads=width // head_width,
        image_size=image_size, patch_size=patch_size, hidden_act=act, layer_norm_eps=LAYER_NORM_EPS)

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


# ---- weights ------------------------------------------------------------------------------------

def key_map(config: CLIPConfig, text_prefix: str = "") -> dict[str, tuple[str, str | tuple[int, int] | None]]:
    """tinyclip parameter name -> (open_clip key, how to take it): None as stored, "T" transposed,
    or (start, stop) rows of a fused in_proj tensor."""
    m = {"logit_scale": ("logit_scale", None),
         "visual_projection.weight": ("visual.proj", "T"),
         "text_projection.weight": (text_prefix + "text_projection", "T"),
         "vision_model.embeddings.class_embedding": ("visual.class_embedding", None),
         "vision_model.embeddings.patch_embedding.weight": ("visual.conv1.weight", None),
         "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", None),
         "text_model.embeddings.token_embedding.weight": (text_prefix + "token_embedding.weight", None),
         "text_model.embeddings.position_embedding.weight": (text_prefix + "positional_embedding", None)}
    for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                         ("vision_model.post_layernorm", "visual.ln_post"),
                         ("text_model.final_layer_norm", text_prefix + "ln_final")):
        for p in ("weight", "bias"):
            m[f"{ours}.{p}"] = (f"{theirs}.{p}", None)
    for ours, theirs, cfg in (("vision_model", "visual.transformer", config.vision_config),
                              ("text_model", text_prefix + "transformer", config.text_config)):
        c = cfg.hidden_size
        for i in range(cfg.num_hidden_layers):
            a, b = f"{ours}.encoder.layers.{i}", f"{theirs}.resblocks.{i}"
            for n, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                m[f"{a}.self_attn.{proj}.weight"] = (f"{b}.attn.in_proj_weight", (n * c, (n + 1) * c))
                m[f"{a}.self_attn.{proj}.bias"] = (f"{b}.attn.in_proj_bias", (n * c, (n + 1) * c))
            for ours_sub, theirs_sub in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                         ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                for p in ("weight", "bias"):
                    m[f"{a}.{ours_sub}.{p}"] = (f"{b}.{theirs_sub}.{p}", None)
    return m


def stored_shape(ours: tuple[int, ...], how) -> tuple[int, ...]:
    """The shape open_clip stores for a tinyclip parameter of shape `ours` taken `how` (see key_map)."""
    if how == "T":
        return tuple(reversed(ours))
    if isinstance(how, tuple):
        return (ours[0] * 3, *ours[1:])
    return tuple(ours)


def weights_file(folder: pathlib.Path) -> pathlib.Path:
    """The folder's open_clip safetensors file (checked not to lead out of the checkpoint through a
    symbolic link, as weights.py checks its files); the pickle is refused, saying how to convert it."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return weights._inside(path, folder)
    if (folder / PICKLE_FILE).exists():
        raise CheckpointError(
            f"{folder}: has {PICKLE_FILE} but no {WEIGHTS_FILE}; tinyclip reads only safetensors and never "
            "unpickles. Convert it once with open_clip and safetensors: model = open_clip.create_model("
            f"'local-dir:{folder}'); safetensors.torch.save_file(model.state_dict(), '{folder / WEIGHTS_FILE}')")
    raise CheckpointError(f"{folder}: has {CONFIG_FILE} but no {WEIGHTS_FILE}; download the checkpoint's "
                          "safetensors weights into the folder")


def load_weights(model, folder: pathlib.Path, dtype, device: str) -> None:
    """Fill `model` (a tinyclip CLIPModel built from `read_config`) from the folder's open_clip
    safetensors, after checking every key and shape with weights.py's strict header checks.

    Each stored tensor is read once; q, k and v are row slices of it, projections its transpose.
    """
    path = weights_file(folder)
    infos = weights.read_safetensors_header(path)
    params = get_state_dict(model)
    # CustomTextCLIP (custom_text: true) keeps the text tower under "text."; open_clip also loads
    # such checkpoints saved without the prefix, so the file decides.
    prefix = "text." if "text.token_embedding.weight" in infos else ""
    plan = key_map(model.config, prefix)
    used = {source for source, _ in plan.values()}
    missing = sorted({plan[k][0] for k in params if plan[k][0] not in infos})
    unexpected = sorted(weights._cut(k) for k in infos if k not in used)
    misshaped = sorted({f"{plan[k][0]}: checkpoint {weights._cut(str(list(infos[plan[k][0]].shape)))}, "
                        f"{CONFIG_FILE} implies {list(stored_shape(tuple(p.shape), plan[k][1]))}"
                        for k, p in params.items() if plan[k][0] in infos and not weights._same_shape(
                            infos[plan[k][0]].shape, stored_shape(tuple(p.shape), plan[k][1]))})
    if missing or unexpected or misshaped:
        raise weights.mismatch_error(f"{path} does not match {CONFIG_FILE}", missing, unexpected, misshaped,
                                     f"Check that {CONFIG_FILE} belongs to these weights and describes a "
                                     "CLIP model (image and text towers).")
    loaded, uses = {}, {}
    for source, _ in plan.values():
        uses[source] = uses.get(source, 0) + 1
    for key, param in params.items():
        source, how = plan[key]
        if source not in loaded:
            loaded[source] = infos[source].load(device, dtype)
        uses[source] -= 1
        # a fused in_proj is kept until its last slice is taken, then dropped
        t = loaded[source] if uses[source] else loaded.pop(source)
        if how == "T":
            t = t.T.contiguous()
        elif isinstance(how, tuple):
            t = t[how[0]:how[1]].contiguous()
        param.replace(t.reshape(param.shape).realize())
