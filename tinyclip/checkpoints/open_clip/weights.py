"""open_clip's weights (`open_clip_model.safetensors`) into tinyclip's model, read strictly.

The keys and layouts differ from transformers' (config.py's docstring lists how); `key_map` names,
for every tinyclip parameter, the open_clip tensor it comes from and how it is taken. The header
checks and the reads are weights.py's.
"""
from __future__ import annotations

import pathlib

from tinygrad.nn.state import get_state_dict

from ... import weights
from ...config import CLIPConfig
from ...errors import CheckpointError
from .config import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE


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
        return weights.inside_checkpoint(path, folder)
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
    unexpected = sorted(weights.cut(k) for k in infos if k not in used)
    misshaped = sorted({f"{plan[k][0]}: checkpoint {weights.cut(str(list(infos[plan[k][0]].shape)))}, "
                        f"{CONFIG_FILE} implies {list(stored_shape(tuple(p.shape), plan[k][1]))}"
                        for k, p in params.items() if plan[k][0] in infos and not weights.same_shape(
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
