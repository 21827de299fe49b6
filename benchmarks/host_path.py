#!/usr/bin/env python
"""The image host path, before and after, in one run: embedding N image files end to end.

    python benchmarks/host_path.py --before /tmp/tinyclip-main      # a copy of another tinyclip tree
    python benchmarks/host_path.py --before /tmp/tinyclip-main --device opencl --images 100 --rounds 3

Each round starts one process per tree (--before, then this one; alternating, so that load and
heat of the machine fall on both alike). A process loads the checkpoint, runs each task once to
compile (or load its graphs), then times each task --repeats times and prints the medians:
- encode_image: `model.encode_image(paths, batch_size=32)` on the N files;
- embed_files:  `tasks.embed_image_files` over the N files, what `tinyclip embed` runs;
- encode_no_prefetch (trees that have Runner.prefetch): encode_image with the prefetch thread off;
- host_only: the host's share of encode_image alone (before: preprocess() of every file, float32;
  after: the processor's uint8 crops).
Each is timed in wall-clock seconds and in the process's CPU seconds ("cpu": all its threads, the
kernels' included), which a busy shared machine disturbs less.
The tasks run in turn within a process. The last lines are the medians (and minima) over every run
and the ratios before/after (above 1: this tree faster).
Files: the test photographs resized to various sizes and saved as JPEG and PNG, made once in a temp dir.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("encode_image", "embed_files")


def make_images(folder: pathlib.Path, n: int) -> list[str]:
    from PIL import Image
    photos = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}.{'jpg' if i % 3 else 'png'}"
        if not path.exists():
            image = Image.open(photos[i % len(photos)]).convert("RGB")
            scale = 0.6 + (i % 7) * 0.25
            image.resize((int(image.width * scale), int(image.height * scale))).save(path)
        paths.append(str(path))
    return paths


def child(args) -> int:
    import tinyclip
    from tinyclip import tasks
    paths = make_images(pathlib.Path(args.image_dir), args.images)
    model = tinyclip.load(args.model, device=args.device)
    runs = {"encode_image": lambda: model.encode_image(paths, batch_size=32),
            "embed_files": lambda: [e for _, e in tasks.embed_image_files(model, paths, batch_size=32)]}
    if hasattr(model.runner, "prefetch"):
        runs["encode_no_prefetch"] = lambda: encode_without_prefetch(model, paths)
    # the host's share alone: what encode_image prepares before uploading (before: float32 pixel
    # values of every image; after: the uint8 crops)
    crop = getattr(model.processor, "crop", None)
    runs["host_only"] = (lambda: [crop(p, i) for i, p in enumerate(paths)]) if crop else \
        (lambda: model.preprocess(paths))
    times = {name: [] for name in runs}
    cpu = {f"{name} cpu": [] for name in runs}
    for fn in runs.values():
        fn()    # compile or load the graphs
    for _ in range(args.repeats):     # the tasks in turn, so that a busy moment falls on each alike
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[f"{name} cpu"].append(time.process_time() - start_cpu)
    print(json.dumps({"tinyclip": tinyclip.__file__, **times, **cpu}))
    return 0


def encode_without_prefetch(model, paths):
    model.runner.prefetch = False
    try:
        return model.encode_image(paths, batch_size=32)
    finally:
        model.runner.prefetch = True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="root of the tinyclip tree to compare with (holds tinyclip/)")
    ap.add_argument("--model", default=str(pathlib.Path(tempfile.gettempdir()) / "tinyclip-bench-vit-b-32"),
                    help="checkpoint folder (default: the random-init ViT-B/32 of benchmarks/speed_gpu.py)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--image-dir", default=str(pathlib.Path(tempfile.gettempdir()) / "tinyclip-host-path-images"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if not (pathlib.Path(args.model) / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config
        build_checkpoint(pathlib.Path(args.model), clip_config(**ARCHITECTURES["openai/clip-vit-base-patch32"]))
    make_images(pathlib.Path(args.image_dir), args.images)
    trees = {"before": pathlib.Path(args.before).resolve(), "after": ROOT}
    results = {name: {} for name in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            env = {**os.environ, "PYTHONPATH": str(tree)}
            cmd = [sys.executable, str(ROOT / "benchmarks" / "host_path.py"), "--child", "--before", str(tree),
                   "--model", args.model, "--device", args.device, "--images", str(args.images),
                   "--repeats", str(args.repeats), "--image-dir", args.image_dir]
            done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            got = json.loads(done.stdout.strip().splitlines()[-1])
            assert got["tinyclip"].startswith(str(tree)), f"{name} ran {got['tinyclip']}, not {tree}"
            tasks = [t for t in got if t != "tinyclip"]
            print(f"round {r + 1} {name:<6} " + "  ".join(f"{t} {statistics.median(got[t]):.3f} s" for t in tasks
                                                        if not t.endswith(" cpu")), flush=True)
            for t in tasks:
                results[name].setdefault(t, []).extend(got[t])
    print(f"seconds for {args.images} images on {args.device}, median (min) of {args.rounds} processes x "
          f"{args.repeats} runs; ratio before/after (above 1: after faster)")
    for t in [*TASKS, "host_only", *(f"{t} cpu" for t in (*TASKS, "host_only"))]:
        b, a = results["before"][t], results["after"][t]
        print(f"{t:<18} before {statistics.median(b):7.3f} ({min(b):.3f})  after {statistics.median(a):7.3f} "
              f"({min(a):.3f})  ratio {statistics.median(b) / statistics.median(a):.2f}x ({min(b) / min(a):.2f}x)")
    if "encode_no_prefetch" in results["after"]:
        n, p = results["after"]["encode_no_prefetch"], results["after"]["encode_image"]
        print(f"{'after, prefetch':<18} off {statistics.median(n):7.3f} ({min(n):.3f})  on {statistics.median(p):7.3f} "
              f"({min(p):.3f})  ratio off/on {statistics.median(n) / statistics.median(p):.2f}x "
              f"({min(n) / min(p):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
