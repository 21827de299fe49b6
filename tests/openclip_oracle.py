"""open_clip's answers for the open_clip tests, computed by open_clip itself.

Runs in the separate oracle environment `.venv-openclip` (torch 2.14.1, torchvision 0.29.1,
open-clip-torch; made by `bash .ci/run`), never in the project's venv: open_clip needs
torchvision, which the project's CPU torch 2.13.0 cannot import, and installing it there would
also switch transformers' image processor to its torchvision backend.

Usage: python tests/openclip_oracle.py JOB.json. JOB.json holds a list of jobs:
- {"kind": "build", "folder", "model_cfg" (or "name"), "preprocess_cfg", "seed", "texts", "ids", "images", "out"}:
  write open_clip_config.json, create a random model with open_clip.create_model (weights perturbed
  so that layer norms and biases are not 1 and 0, batch norms given running statistics), save it as open_clip_model.safetensors, then
  load the folder back with open_clip's own loader (create_model_and_transforms("local-dir:...")) and
  get_tokenizer("local-dir:...") and write its tokens, pixels (the eval transform on the PIL images
  opened from `images`), image and text features and logits_per_image (float64) to `out` (.npz).
- {"kind": "save_for_hf", "folder", "model_cfg", "seed", "texts", "images", "out"}: a random model
  (as "build") written by open_clip's own `push_to_hf_hub.save_for_hf` (safetensors only; the
  default tokenizer, which saves no files), then answered as "build" does.
- {"kind": "answer", "folder", "texts", "images", "out"}: that second half alone, in float32, for an
  existing open_clip folder (validate.py).
- {"kind": "tokens", "name", "texts", "out"}: get_tokenizer(name) on the texts; with the tokenizer's
  vocabulary (encoder) as JSON.
- {"kind": "configs", "names", "models", "out"}: each built-in model config of `names`, and for those
  in `models` the parameter shapes, activation, head counts and layer-norm eps of the model open_clip
  builds from it (on the meta device: no memory).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file


def build(job):
    folder = Path(job["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = job.get("model_cfg") or open_clip.get_model_config(job["name"])
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": job["preprocess_cfg"]}, indent=2))
    torch.manual_seed(job["seed"])
    model = open_clip.create_model("local-dir:" + str(folder))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        batch_norm_statistics(model)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    del model
    answer({**job, "float64": True})


def batch_norm_statistics(model):
    """A ResNet's batch norms with scales, shifts and running statistics far from their initial 1, 0,
    0 and 1 (as a trained model's are), so that folding them is tested; a ViT has none."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(1000)


def save_for_hf(job):
    from open_clip.push_to_hf_hub import save_for_hf as save

    class DefaultTokenizer(open_clip.SimpleTokenizer):
        """open_clip's default tokenizer, which has no files to save (its BPE ships inside open_clip)."""
        def save_pretrained(self, dest):
            pass

    # create_model sets what save_for_hf reads (visual.image_mean, image_std); it reads its config
    # from a folder, so the model_cfg goes through one first.
    with tempfile.TemporaryDirectory() as source:
        (Path(source) / "open_clip_config.json").write_text(json.dumps({"model_cfg": job["model_cfg"]}))
        torch.manual_seed(job["seed"])
        model = open_clip.create_model("local-dir:" + source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save(model, DefaultTokenizer(), job["model_cfg"], job["folder"], safe_serialization=True)
    del model
    answer({**job, "float64": True})


def answer(job):
    """open_clip reads the folder with its own loader, tokenizer and transform, and answers."""
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + job["folder"])
    tokenizer = open_clip.get_tokenizer("local-dir:" + job["folder"])
    dtype = torch.float64 if job.get("float64") else torch.float32
    model = model.eval().to(dtype)
    tokens = tokenizer(job["texts"])
    pixels = torch.stack([preprocess(Image.open(p)) for p in job["images"]])
    with torch.no_grad():
        img = model.encode_image(pixels.to(dtype))
        txt = model.encode_text(tokens)
        # token ids given directly (pooling where the end token is missing or repeated)
        txt_ids = model.encode_text(torch.tensor(job["ids"])) if job.get("ids") else torch.zeros(0)
        img_n, txt_n = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp() * img_n @ txt_n.T
    np.savez(job["out"], tokens=tokens.numpy(), pixels=pixels.numpy(), image_embeds=img.numpy(),
             text_embeds=txt.numpy(), ids=np.array(job.get("ids") or []), text_embeds_ids=txt_ids.numpy(),
             logits=logits.numpy())


def tokens(job):
    tokenizer = open_clip.get_tokenizer(job["name"])
    np.savez(job["out"], tokens=tokenizer(job["texts"]).numpy(),
             encoder=np.array(json.dumps(tokenizer.encoder, ensure_ascii=False)))


def configs(job):
    out = {}
    for name in job["names"]:
        cfg = open_clip.get_model_config(name)
        entry = {"model_cfg": cfg}
        if name not in job["models"]:
            out[name] = entry
            continue
        try:
            with torch.device("meta"):
                model = open_clip.create_model(name, pretrained=None, device="meta")
        except Exception as e:   # an architecture open_clip cannot build here (e.g. a missing timm)
            entry["error"] = f"{type(e).__name__}: {e}"
        else:
            entry["shapes"] = {k: list(v.shape) for k, v in model.state_dict().items()}
            if not hasattr(model.visual, "transformer"):    # a ModifiedResNet: the text tower's block only
                entry["text_pool"] = getattr(model, "text_pool_type", None)
                entry["heads"] = model.visual.attnpool.num_heads
                out[name] = entry
                continue
            blocks = {"vision": model.visual.transformer.resblocks[0],
                      "text": (model.transformer if hasattr(model, "transformer") else model.text.transformer)
                      .resblocks[0]}
            entry["blocks"] = {tower: {"act": type(b.mlp.gelu).__name__,
                                       "approximate": getattr(b.mlp.gelu, "approximate", None),
                                       "heads": b.attn.num_heads, "eps": b.ln_1.eps}
                               for tower, b in blocks.items()}
            entry["text_pool"] = getattr(model, "text_pool_type", None)
        out[name] = entry
    Path(job["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        {"build": build, "save_for_hf": save_for_hf, "answer": answer, "tokens": tokens, "configs": configs}[job["kind"]](job)
