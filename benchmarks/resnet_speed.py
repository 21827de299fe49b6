#!/usr/bin/env python
"""OpenAI's RN50 CLIP image tower: tinyclip against open_clip on the same machine.

    python benchmarks/resnet_speed.py                       # random-init RN50 built by open_clip, cpu backend
    python benchmarks/resnet_speed.py --model FOLDER --device cpu-llvm --batches 1 8 --repeats 5

open_clip runs in its own environment, `.venv-openclip` (see tests/openclip_oracle.py), so each library
times itself in a child process on the same pixels: median images per second over `--repeats` runs after
one warm-up (which compiles tinyclip's graph). On the cpu backend tinyclip is timed twice, with its
convolutions as im2col onto the tiled matmul (kernels/cpu/conv.py) and as tinygrad's own conv
(TINYCLIP_CONV=tinygrad), which is how the kernel set's choice was made (README, "ResNet CLIPs").
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLE = ROOT / ".venv-openclip" / "bin" / "python"

CHILD = r"""
import json, statistics, sys, time
import numpy as np
lib, folder, device, batches, repeats = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
size = json.load(open(folder + "/open_clip_config.json"))["model_cfg"]["vision_cfg"].get("image_size", 224)
if lib == "tinyclip":
    import tinyclip
    m = tinyclip.load(folder, device=device)
    run = lambda x: m.encode_image(x, batch_size=len(x))
else:
    import open_clip, torch
    model = open_clip.create_model("local-dir:" + folder).eval()
    def run(x):
        with torch.no_grad():
            return model.encode_image(torch.from_numpy(x)).numpy()
out = {}
for b in batches:
    x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
    run(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); run(x); times.append(time.perf_counter() - t)
    out[b] = b / statistics.median(times)
print(json.dumps(out))
"""


def child(python, lib: str, folder: str, device: str, batches: list[int], repeats: int, env=None) -> dict:
    done = subprocess.run([str(python), "-c", CHILD, lib, folder, device, json.dumps(batches), str(repeats)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if done.returncode:
        sys.exit(f"{lib} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_rn50(folder: pathlib.Path) -> None:
    """A random-init RN50 in open_clip's layout, written by open_clip (tests/openclip_oracle.py)."""
    image = str(ROOT / "tests" / "data" / "images" / "chelsea.png")
    with tempfile.TemporaryDirectory() as work:
        jobs = pathlib.Path(work) / "jobs.json"
        jobs.write_text(json.dumps([{"kind": "build", "folder": str(folder), "name": "RN50", "seed": 0,
                                     "preprocess_cfg": {}, "texts": ["a cat"], "images": [image],
                                     "out": str(pathlib.Path(work) / "answer.npz")}]))
        subprocess.run([str(ORACLE), str(ROOT / "tests" / "openclip_oracle.py"), str(jobs)], check=True, cwd=ROOT,
                       capture_output=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an open_clip ResNet folder (default: a random-init RN50 built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not ORACLE.exists():
        sys.exit(f"{ORACLE} is missing; `bash .ci/run` creates .venv-openclip")
    with tempfile.TemporaryDirectory() as work:
        folder = args.model or str(pathlib.Path(work) / "RN50")
        if not args.model:
            build_rn50(pathlib.Path(folder))
        rows = {"open_clip": child(ORACLE, "open_clip", folder, args.device, args.batches, args.repeats)}
        variants = {"tinyclip": {}}
        if args.device.startswith("cpu") and args.device != "cpu-llvm":
            variants = {"tinyclip (im2col)": {"TINYCLIP_CONV": "im2col"},
                        "tinyclip (tinygrad conv)": {"TINYCLIP_CONV": "tinygrad"}}
        for name, env in variants.items():
            env["TINYCLIP_GRAPH_CACHE"] = "0"
            rows[name] = child(sys.executable, "tinyclip", folder, args.device, args.batches, args.repeats, env)
    print(f"images/s, {args.device}, median of {args.repeats}")
    print(f"{'':26}" + "".join(f"{'batch ' + str(b):>12}" for b in args.batches))
    for name, row in rows.items():
        print(f"{name:26}" + "".join(f"{row[str(b)]:12.2f}" for b in args.batches))


if __name__ == "__main__":
    main()
