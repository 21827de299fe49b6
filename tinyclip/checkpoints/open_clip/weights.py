"""open_clip's weights (`open_clip_model.safetensors`) into tinyclip's model, read strictly.

The keys and layouts differ from transformers' (config.py's docstring lists how); `key_map` names,
for every tinyclip parameter, the open_clip tensor it comes from and how it is taken. The header
checks and the reads are weights.py's.
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
from tinygrad.nn.state import get_state_dict

from ... import _tinygrad, weights
from ...config import CLIPConfig, ResNetVisionConfig
from ...errors import CheckpointError
from .config import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE


@dataclass(frozen=True)
class Fold:
    """How a folded convolution's parameter is made: the batch norm `bn` (its key prefix) applied to
    the convolution's weight ("weight") or giving the bias ("bias")."""
    bn: str
    part: str


BN_STATS = ("weight", "running_mean", "running_var")    # with .bias: what folding reads of a batch norm
BN_COUNTER = "num_batches_tracked"                        # an integer that only training reads


def key_map(config: CLIPConfig, text_prefix: str = "") -> dict[str, tuple[str, str | tuple[int, int] | Fold | None]]:
    """tinyclip parameter name -> (open_clip key, how to take it): None as stored, "T" transposed,
    (start, stop) rows of a fused in_proj tensor, or a `Fold` (a ResNet's batch norm)."""
    m = {"logit_scale": ("logit_scale", None),
         "text_projection.weight": (text_prefix + "text_projection", "T"),
         "text_model.embeddings.token_embedding.weight": (text_prefix + "token_embedding.weight", None),
         "text_model.embeddings.position_embedding.weight": (text_prefix + "positional_embedding", None),
         "text_model.final_layer_norm.weight": (text_prefix + "ln_final.weight", None),
         "text_model.final_layer_norm.bias": (text_prefix + "ln_final.bias", None)}
    towers = [("text_model", text_prefix + "transformer", config.text_config)]
    if isinstance(config.vision_config, ResNetVisionConfig):
        m |= _resnet_map(config.vision_config)
    else:
        m |= {"visual_projection.weight": ("visual.proj", "T"),
              "vision_model.embeddings.class_embedding": ("visual.class_embedding", None),
              "vision_model.embeddings.patch_embedding.weight": ("visual.conv1.weight", None),
              "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", None)}
        for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                             ("vision_model.post_layernorm", "visual.ln_post")):
            for p in ("weight", "bias"):
                m[f"{ours}.{p}"] = (f"{theirs}.{p}", None)
        towers.append(("vision_model", "visual.transformer", config.vision_config))
    for ours, theirs, cfg in towers:
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


def _resnet_map(v: ResNetVisionConfig) -> dict:
    """The ModifiedResNet's keys: tinyclip's names are open_clip's, each convolution taking its batch
    norm (bn1..bn3 beside conv1..conv3; downsample.1 after downsample.0) folded in."""
    m = {}

    def fold(ours: str, conv: str, bn: str) -> None:
        m[f"visual.{ours}.weight"] = (f"visual.{conv}.weight", Fold(f"visual.{bn}", "weight"))
        m[f"visual.{ours}.bias"] = (f"visual.{bn}.bias", Fold(f"visual.{bn}", "bias"))

    for j in (1, 2, 3):
        fold(f"conv{j}", f"conv{j}", f"bn{j}")
    inplanes = v.width
    for i, blocks in enumerate(v.layers):
        planes = v.width * 2 ** i
        for b in range(blocks):
            block = f"layer{i + 1}.{b}"
            for j in (1, 2, 3):
                fold(f"{block}.conv{j}", f"{block}.conv{j}", f"{block}.bn{j}")
            if b == 0 and (i > 0 or inplanes != planes * 4):   # model.Bottleneck's rule
                fold(f"{block}.downsample", f"{block}.downsample.0", f"{block}.downsample.1")
            inplanes = planes * 4
    m["visual.attnpool.positional_embedding"] = ("visual.attnpool.positional_embedding", None)
    for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
        for p in ("weight", "bias"):
            m[f"visual.attnpool.{proj}.{p}"] = (f"visual.attnpool.{proj}.{p}", None)
    return m


def stored_shape(ours: tuple[int, ...], how) -> tuple[int, ...]:
    """The shape open_clip stores for a tinyclip parameter of shape `ours` taken `how` (see key_map)."""
    if isinstance(how, Fold):
        return tuple(ours)
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


def load_weights(model, folder: pathlib.Path, dtype, device: str, only=None, checked=None) -> None:
    """Fill `model` (a tinyclip CLIPModel built from `read_config`) from the folder's open_clip
    safetensors, after checking every key and shape with weights.py's strict header checks. `only(key)`,
    when given, picks the parameters to read now; every key's presence is checked all the same, and the
    shapes of those `checked(key)` accepts (default: those read, as weights.load_weights).

    Each stored tensor is read once; q, k and v are row slices of it, projections its transpose. A
    ResNet's batch norms are folded into their convolutions in float64 before the upload.
    """
    path = weights_file(folder)
    infos = weights.read_safetensors_header(path, skip=lambda key: key.endswith("." + BN_COUNTER))
    params = get_state_dict(model)
    # CustomTextCLIP (custom_text: true) keeps the text tower under "text."; open_clip also loads
    # such checkpoints saved without the prefix, so the file decides.
    prefix = "text." if "text.token_embedding.weight" in infos else ""
    plan = key_map(model.config, prefix)
    # what each stored tensor must be: the parameters' sources, and the statistics of folded batch norms
    checked = checked or only or (lambda key: True)
    expected = {plan[k][0]: stored_shape(tuple(p.shape), plan[k][1]) for k, p in params.items()}
    shaped = {plan[k][0] for k in params if checked(k)}     # the stored tensors whose shapes are checked now
    for key, p in params.items():
        how = plan[key][1]
        if isinstance(how, Fold) and how.part == "bias":
            expected |= {f"{how.bn}.{stat}": tuple(p.shape) for stat in BN_STATS}
            shaped |= {f"{how.bn}.{stat}" for stat in BN_STATS} if checked(key) else set()
    missing = sorted(k for k in expected if k not in infos)
    unexpected = sorted(weights.cut(k) for k in infos if k not in expected)
    misshaped = sorted(f"{k}: checkpoint {weights.cut(str(list(infos[k].shape)))}, {CONFIG_FILE} implies {list(shape)}"
                       for k, shape in expected.items()
                       if k in infos and k in shaped and not weights.same_shape(infos[k].shape, shape))
    if missing or unexpected or misshaped:
        raise weights.mismatch_error(f"{path} does not match {CONFIG_FILE}", missing, unexpected, misshaped,
                                     f"Check that {CONFIG_FILE} belongs to these weights and describes a "
                                     "CLIP model (image and text towers).")
    bn_eps = getattr(model.config.vision_config, "batch_norm_eps", None)
    if only is not None:
        params = {key: param for key, param in params.items() if only(key)}
    loaded, uses = {}, {}
    for source, _ in (plan[key] for key in params):
        uses[source] = uses.get(source, 0) + 1
    for key, param in params.items():
        source, how = plan[key]
        if isinstance(how, Fold):
            param.replace(_folded(infos, source, how, bn_eps, dtype, device).reshape(param.shape).realize())
            continue
        uses[source] -= 1
        if how is None:
            param.replace(infos[source].load(device, dtype).reshape(param.shape))
            continue
        # Transposed or sliced in numpy, each into a buffer of its own: a slice taken in tinygrad is a view
        # of the fused in_proj's buffer, which the graph cache could not name as the parameter (it stores
        # weights by state-dict name and binds them to the loaded model's), so a graph captured with one
        # checkpoint would have run another's q, k and v biases. A fused in_proj is kept until its last
        # slice is taken, then dropped.
        if source not in loaded:
            loaded[source] = infos[source].array().astype(_tinygrad.numpy_dtype(dtype), copy=False)
        array = loaded[source] if uses[source] else loaded.pop(source)
        array = array.T if how == "T" else array[how[0]:how[1]]
        param.replace(_tinygrad.from_numpy(array.reshape(param.shape), device))


def _folded(infos: dict, source: str, how: Fold, eps: float, dtype, device: str):
    """Eval-mode batch norm after a bias-free convolution is y = conv(x) * s + (beta - mean * s) with
    s = gamma / sqrt(var + eps) per output channel: the convolution's weight scaled by s, and a bias."""
    gamma, mean, var = (infos[f"{how.bn}.{stat}"].array().astype(np.float64) for stat in BN_STATS)
    scale = gamma / np.sqrt(var + eps)
    if how.part == "weight":
        folded = infos[source].array().astype(np.float64) * scale[:, None, None, None]
    else:
        folded = infos[source].array().astype(np.float64) - mean * scale
    return _tinygrad.from_numpy(folded.astype(_tinygrad.numpy_dtype(dtype)), device)
