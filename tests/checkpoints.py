"""CLIP checkpoints built offline with transformers: real CLIPConfigs, random weights.

The tests build their checkpoints here (tests/conftest.py), and so do validate.py and the
benchmarks when the hub is out of reach. A built folder holds what save_pretrained writes
(config.json, model.safetensors), the real CLIP vocabulary (tests/bpe.py) and a matching
preprocessor_config.json, so tinyclip and transformers both load it. From the repository root:

    python -m tests.checkpoints openai/clip-vit-base-patch32 ./vit-b-32-random
    tinyclip classify cat.jpg --labels cat dog --model ./vit-b-32-random

The weights are random (transformers' initialisation): such a checkpoint proves that tinyclip
computes what transformers computes, not what the released weights see in an image.
"""
from __future__ import annotations

import argparse
import pathlib

from .bpe import write_clip_vocab

# Real architectures (openai/clip-vit-*): (hidden, intermediate, layers, heads) for the text
# tower, the same plus (image size, patch size) for the vision tower, and the projection width.
ARCHITECTURES = {
    "openai/clip-vit-base-patch32": dict(text=(512, 2048, 12, 8), vision=(768, 3072, 12, 12, 224, 32), proj=512),
    "openai/clip-vit-base-patch16": dict(text=(512, 2048, 12, 8), vision=(768, 3072, 12, 12, 224, 16), proj=512),
    "openai/clip-vit-large-patch14": dict(text=(768, 3072, 12, 12), vision=(1024, 4096, 24, 16, 224, 14), proj=768),
}


def clip_config(text=(512, 2048, 12, 8), vision=(768, 3072, 12, 12, 224, 32), proj=512, **overrides):
    """A transformers CLIPConfig from (hidden, intermediate, layers, heads[, image, patch]) tuples."""
    import transformers
    th, ti, tl, tn = text
    vh, vi, vl, vn, image, patch = vision
    t = dict(hidden_size=th, intermediate_size=ti, num_hidden_layers=tl, num_attention_heads=tn)
    v = dict(hidden_size=vh, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vn,
             image_size=image, patch_size=patch)
    t.update(overrides.pop("text_overrides", {}))
    v.update(overrides.pop("vision_overrides", {}))
    return transformers.CLIPConfig(text_config=t, vision_config=v, projection_dim=proj, **overrides)


def build_checkpoint(folder, config, seed: int = 0, perturb: float = 0.0):
    """Save a random-init transformers CLIPModel with the real CLIP tokenizer and a matching
    preprocessor_config.json into `folder`; returns the torch model (in eval mode).

    `perturb` adds noise of that scale to every parameter, so that LayerNorm weights, biases and
    logit_scale all differ from their initial constants and a test notices if one is ignored.
    """
    import torch
    import transformers
    folder = pathlib.Path(folder)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
    model.save_pretrained(folder, safe_serialization=True)
    write_clip_vocab(folder)
    size = config.vision_config.image_size
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}) \
        .save_pretrained(folder)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.checkpoints", description="Build a CLIP checkpoint with "
                                 "random weights offline (needs torch and transformers: pip install -e '.[test]').")
    ap.add_argument("architecture", choices=sorted(ARCHITECTURES), help="whose shapes to copy")
    ap.add_argument("folder", type=pathlib.Path, help="where to save it (created)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random weights (default: 0)")
    args = ap.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    build_checkpoint(args.folder, clip_config(**ARCHITECTURES[args.architecture]), seed=args.seed)
    print(f"built {args.folder}: the {args.architecture} architecture with RANDOM weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
