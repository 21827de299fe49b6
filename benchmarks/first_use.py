#!/usr/bin/env python
"""A new user's first hour, timed: each command in a fresh process, as typed.

    python benchmarks/first_use.py [--model FOLDER] [--tinyclip PATH/TO/tinyclip] [--skip-transformers]
                                   [--only one-warm,api-warm,one-cold,ten-after-embed,classify,search,embed]

Scenarios (random-init ViT-B/32 by default, the cpu backend, tinygrad's kernel cache and tinyclip's
caches new and empty at the start of each scenario, kept within it):
- one-warm: `classify` of one photograph against 3 labels without templates, caches warm (the median of
  REPEATS runs, after one that fills the caches);
- api-warm: a script that calls load() and encode_image() on one photograph, caches warm (the same way);
- one-cold: that classify with empty caches, as on a new machine;
- ten-after-embed: after an `embed` of 100 images (which compiles the 32-image graph), ten one-photograph
  classify processes in a row (the embed itself is not timed);
- classify: 6 photographs against 10 labels with the 80 ImageNet templates (800 prompts);
- search: 5 text queries of different lengths against an .npz of the 6 photographs, one process each;
- embed: 100 images (the photographs, resized copies) into an .npz.
Prints wall seconds per scenario for tinyclip's CLI (`--tinyclip` picks the executable, so an older
checkout's can be timed the same way) and for the same work in transformers (one process per command
too: import, load, compute), and beside each the CPU seconds the commands and their child processes
(compile workers, clang) used: on a machine that others share, wall time depends on what they run,
CPU time much less.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "horse", "rocket", "astronaut", "coffee", "camera", "tree", "ship", "bird"]
QUERIES = ["a cat", "a photo of a dog", "an astronaut riding a horse on the moon", "coffee",
           "a black and white photograph of a man holding an old camera in a busy street"]

TRANSFORMERS = r"""
import runpy, sys, numpy as np, torch, transformers
from PIL import Image
job, folder, templates, *rest = sys.argv[1:]
IMAGENET_TEMPLATES = runpy.run_path(templates)["IMAGENET_TEMPLATES"]   # the same prompts, without importing tinyclip
model = transformers.CLIPModel.from_pretrained(folder).eval()
tok = transformers.CLIPTokenizer.from_pretrained(folder)
proc = transformers.CLIPImageProcessorPil.from_pretrained(folder)
def feats(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out
with torch.no_grad():
    if job in ("classify", "classify-plain"):
        labels, images = rest[0].split(","), rest[1:]
        prompts = [t.format(l) for l in labels for t in IMAGENET_TEMPLATES] if job == "classify" else labels
        txt = torch.cat([feats(model.get_text_features(**tok(prompts[i:i + 32], padding=True, return_tensors="pt")))
                         for i in range(0, len(prompts), 32)])
        pil = [Image.open(p).convert("RGB") for p in images]
        img = feats(model.get_image_features(**proc(pil, return_tensors="pt")))
    elif job == "search":
        feats(model.get_text_features(**tok([rest[0]], padding=True, return_tensors="pt")))
    elif job == "api":
        feats(model.get_image_features(**proc([Image.open(rest[0]).convert("RGB")], return_tensors="pt")))
    else:
        for i in range(0, len(rest), 32):
            feats(model.get_image_features(**proc([Image.open(p).convert("RGB") for p in rest[i:i + 32]],
                                                  return_tensors="pt")))
"""


class Seconds:
    """Wall and CPU seconds (user + system, of the commands and every child process they waited for)."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall, self.cpu = wall, cpu

    def __add__(self, other: "Seconds") -> "Seconds":
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def __radd__(self, other) -> "Seconds":     # sum() starts from 0
        return self if other == 0 else self + other

    def __str__(self) -> str:
        return f"{self.wall:6.1f} s (cpu {self.cpu:6.1f} s)"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


API = r"""
import sys, tinyclip
tinyclip.load(sys.argv[1], device="cpu").encode_image([sys.argv[2]])
"""
REPEATS = 3
SCENARIOS = ("one-warm", "api-warm", "one-cold", "ten-after-embed", "classify", "search", "embed")
WHAT = {"one-warm": "1 image x 3 labels, no templates, warm", "api-warm": "load() + encode_image, 1 image, warm",
        "one-cold": "1 image x 3 labels, no templates, empty caches",
        "ten-after-embed": "10 one-image classify processes after an embed",
        "classify": "6 images x 10 labels x 80 templates", "search": "5 text queries, 5 processes",
        "embed": "100 images"}


def median(runs: list[Seconds]) -> Seconds:
    runs = sorted(runs, key=lambda s: s.wall)
    return runs[len(runs) // 2]


def timed(cmd, env) -> Seconds:
    start, cpu = time.perf_counter(), _children_cpu()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed:\n{r.stderr[-2000:]}")
    return Seconds(time.perf_counter() - start, _children_cpu() - cpu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: a random-init ViT-B/32 built in a temp dir)")
    ap.add_argument("--tinyclip", default=str(pathlib.Path(sys.executable).parent / "tinyclip"))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--only", help=f"comma-separated scenarios (default: all): {', '.join(SCENARIOS)}")
    args = ap.parse_args(argv)
    from PIL import Image
    from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config
    folder = pathlib.Path(args.model) if args.model else pathlib.Path(tempfile.gettempdir()) / "tinyclip-bench-vit-b-32"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, clip_config(**ARCHITECTURES["openai/clip-vit-base-patch32"]))
    photos = sorted(str(p) for p in (ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        hundred = work / "hundred"
        hundred.mkdir()
        for i in range(100):
            with Image.open(photos[i % len(photos)]) as im:
                im.convert("RGB").resize((200 + i, 180 + i)).save(hundred / f"{i:03d}.jpg")
        many = sorted(str(p) for p in hundred.glob("*.jpg"))

        def fresh_env():
            caches = work / f"caches-{time.monotonic_ns()}"
            caches.mkdir()
            return dict(os.environ, TINYCLIP_CACHE_DIR=str(caches / "tinyclip"), CACHEDB=str(caches / "kernels.db"))

        model = ["--model", str(folder), "--device", "cpu"]
        one = [photos[0], "--labels", "cat", "dog", "hot-air balloon", "--templates", "none"]
        wanted = args.only.split(",") if args.only else list(SCENARIOS)
        hf_env, templates = dict(os.environ), str(ROOT / "tinyclip" / "templates.py")
        python = [sys.executable, "-c", TRANSFORMERS]
        hf_one = [*python, "classify-plain", str(folder), templates, "cat,dog,hot-air balloon", photos[0]]
        tc, hf = {}, {}
        hf_timed = timed if not args.skip_transformers else (lambda cmd, env: Seconds())
        for name in wanted:
            if name not in SCENARIOS:
                ap.error(f"--only: unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
            env = fresh_env()
            if name == "one-warm":
                timed([args.tinyclip, "classify", *one, *model], env)
                tc[name] = median([timed([args.tinyclip, "classify", *one, *model], env) for _ in range(REPEATS)])
                hf[name] = median([hf_timed(hf_one, hf_env) for _ in range(REPEATS)])
            elif name == "api-warm":
                api = [sys.executable, "-c", API, str(folder), photos[0]]
                timed(api, env)
                tc[name] = median([timed(api, env) for _ in range(REPEATS)])
                hf[name] = median([hf_timed([*python, "api", str(folder), templates, photos[0]], hf_env)
                                   for _ in range(REPEATS)])
            elif name == "one-cold":
                tc[name] = timed([args.tinyclip, "classify", *one, *model], env)
                hf[name] = hf_timed(hf_one, hf_env)
            elif name == "ten-after-embed":
                subprocess.run([args.tinyclip, "embed", str(hundred), "--out", str(work / "ten.npz"), *model], env=env,
                               check=True, capture_output=True)
                tc[name] = sum(timed([args.tinyclip, "classify", many[i], *one[1:], *model], env) for i in range(10))
                hf[name] = sum(hf_timed([*python, "classify-plain", str(folder), templates, "cat,dog,hot-air balloon",
                                      many[i]], hf_env) for i in range(10))
            elif name == "classify":
                tc[name] = timed([args.tinyclip, "classify", *photos, "--labels", *LABELS, *model], env)
                hf[name] = hf_timed([*python, "classify", str(folder), templates, ",".join(LABELS), *photos], hf_env)
            elif name == "search":
                npz = work / "photos.npz"
                subprocess.run([args.tinyclip, "embed", *photos, "--out", str(npz), *model], env=env, check=True,
                               capture_output=True)
                tc[name] = sum(timed([args.tinyclip, "search", q, "--images", str(npz), *model], env) for q in QUERIES)
                hf[name] = sum(hf_timed([*python, "search", str(folder), templates, q], hf_env) for q in QUERIES)
            else:
                tc[name] = timed([args.tinyclip, "embed", str(hundred), "--out", str(work / "h.npz"), *model], env)
                hf[name] = hf_timed([*python, "embed", str(folder), templates, *many], hf_env)
            line = f"{name:<16} ({WHAT[name]}): tinyclip {tc[name]}"
            if not args.skip_transformers:
                line += f"   transformers {hf[name]}   ratio {tc[name].wall / hf[name].wall:5.2f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
