"""Throughput and memory of `--engine ray` against single-process embedding (a benchmark, not a test).

    python benchmarks/ray_embed.py                      # throughput: N images, ViT-B/32 random init
    python benchmarks/ray_embed.py --memory 10000       # RSS of driver and workers over 10,000 small images

Throughput: one folder of generated JPEGs (tests/data images resized, re-encoded), one model. The
single-process path is what `tinyclip embed` runs (tinyclip.load, then tasks.embed_image_files); the
Ray path is tinyclip.ray.embed_to_folder on a local Ray started beforehand (its start-up is printed
apart: on a cluster it is paid once). Both times include loading the model; the graph cache is
warmed first so neither pays for compiling. Also printed: what one image costs in each stage
(decode + preprocess on one core, encode in batches), from which a cluster can be sized.

Memory: the same pipeline over many small images with a tiny checkpoint, printing the driver's and
the Ray workers' resident memory as shards are written.

Needs torch and transformers only to build the random-init checkpoints (validate.build_checkpoint).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def build_model(name: str, folder: pathlib.Path) -> str:
    from validate import ARCHITECTURES, build_checkpoint, clip_config
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY
    spec = TINY.get(name) or ARCHITECTURES[name]
    build_checkpoint(folder, clip_config(**spec), seed=0, perturb=0.02 if name in TINY else 0.0)
    return str(folder)


def make_images(folder: pathlib.Path, n: int, size: int, fmt: str) -> list[str]:
    originals = [Image.open(p).convert("RGB") for p in sorted((ROOT / "tests/data/images").glob("*.[jp][pn]g"))]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        w, h = size + int(rng.integers(0, size // 2)), size + int(rng.integers(0, size // 2))
        path = sub / f"{i:06d}.{fmt}"
        originals[i % len(originals)].resize((w, h)).save(path)
        paths.append(str(path))
    return paths


def rss_mib(pid: int | str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ray_worker_rss() -> dict[int, float]:
    """RSS (MiB) of this machine's Ray worker processes (titled ray::...), by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::"):
                        out[int(entry)] = rss_mib(entry)
            except OSError:
                continue
    return out


def throughput(args, work: pathlib.Path) -> None:
    import ray
    import tinyclip
    import tinyclip.ray as tinyclip_ray
    from tinyclip import tasks
    from tinyclip.preprocess import load_image

    model = args.model or build_model("openai/clip-vit-base-patch32", work / "model")
    paths = make_images(work / "images", args.images, args.size, "jpg")
    print(f"{len(paths)} JPEG images of {args.size}-{args.size * 3 // 2} px, model {args.model or 'ViT-B/32 random init'}, "
          f"batch {args.batch_size}; CPU: {os.cpu_count()} cores")

    clip = tinyclip.load(model)
    for _ in tasks.embed_image_files(clip, paths[:args.batch_size], batch_size=args.batch_size):
        pass                                          # warms the graph cache for both paths
    t = time.perf_counter()
    pixels = np.concatenate([clip.preprocess(load_image(p)) for p in paths[:args.stage_images]])
    decode_s = (time.perf_counter() - t) / len(pixels)
    t = time.perf_counter()
    clip.encode_image(pixels, batch_size=args.batch_size)
    encode_s = (time.perf_counter() - t) / len(pixels)
    print(f"stage costs (in one process): decode + preprocess {1000 * decode_s:.1f} ms/image on one core, "
          f"encode {1000 * encode_s:.1f} ms/image (batches of {args.batch_size}, all cores)")
    del clip

    t = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    print(f"local Ray start: {time.perf_counter() - t:.1f} s (paid once per cluster, not per run)")
    ray.data.DataContext.get_current().enable_progress_bars = False

    results = {"single": [], "ray": []}
    for r in range(args.repeats):
        t = time.perf_counter()
        clip = tinyclip.load(model)
        n = sum(len(p) for p, _ in tasks.embed_image_files(clip, paths, batch_size=args.batch_size))
        results["single"].append(n / (time.perf_counter() - t))
        del clip
        out = work / f"out-{r}"
        t = time.perf_counter()
        manifest = tinyclip_ray.embed_to_folder(paths, out, model, batch_size=args.batch_size, workers=args.workers)
        results["ray"].append(manifest["count"] / (time.perf_counter() - t))
        print(f"run {r + 1}: single process {results['single'][-1]:.1f} images/s, ray ({args.workers} worker"
              f"{'s' * (args.workers > 1)}) {results['ray'][-1]:.1f} images/s")
        shutil.rmtree(out)
    single, on_ray = float(np.median(results["single"])), float(np.median(results["ray"]))
    print(f"median of {args.repeats}: single {single:.1f} images/s, ray {on_ray:.1f} images/s, "
          f"ray / single = {on_ray / single:.2f}x; {on_ray / args.workers:.1f} images/s per worker")
    ray.shutdown()


def memory(args, work: pathlib.Path) -> None:
    import ray
    import tinyclip.ray as tinyclip_ray

    model = args.model or build_model("tiny-quick", work / "model")
    t = time.perf_counter()
    paths = make_images(work / "images", args.memory, 24, "png")
    print(f"{len(paths)} PNG images of 24-36 px made in {time.perf_counter() - t:.1f} s; "
          f"model {args.model or 'tiny-quick'}, batch {args.batch_size}, shards of {args.shard_rows} rows")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"driver RSS after ray.init: {rss_mib():.0f} MiB")
    print(f"{'done':>7} {'driver MiB':>11} {'workers':>8} {'worker max MiB':>15} {'workers sum MiB':>16}")
    every = max(1, args.memory // 20)
    last = [-every]

    def report(done, total):
        if done - last[0] >= every or done == total:
            last[0] = done
            workers = ray_worker_rss()
            print(f"{done:>7} {rss_mib():>11.0f} {len(workers):>8} {max(workers.values(), default=0):>15.0f} "
                  f"{sum(workers.values()):>16.0f}", flush=True)

    t = time.perf_counter()
    manifest = tinyclip_ray.embed_to_folder(paths, work / "out", model, batch_size=args.batch_size,
                                            shard_rows=args.shard_rows, on_progress=report)
    print(f"{manifest['count']} embedded in {time.perf_counter() - t:.1f} s")
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="images for the throughput run (default 300)")
    p.add_argument("--size", type=int, default=256, help="shorter side of the generated images (px)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: a random-init one is built)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stage-images", type=int, default=64, help="images timed for the stage costs")
    p.add_argument("--memory", type=int, default=0, metavar="N", help="run the memory benchmark on N images instead")
    p.add_argument("--shard-rows", type=int, default=1024)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tinyclip-ray-bench-") as tmp:
        (memory if args.memory else throughput)(args, pathlib.Path(tmp))


if __name__ == "__main__":
    main()
