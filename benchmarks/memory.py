#!/usr/bin/env python
"""Does memory stay flat while tinyclip embeds many images in a loop?

    python benchmarks/memory.py                       # 10,000 images, tiny random checkpoint, cpu
    python benchmarks/memory.py --images 2000 --model FOLDER --device cpu-llvm --files

Embeds `--images` synthetic images in a loop of `--batch` images per call
(each call as a user would make it: a list of HWC uint8 arrays, or with
`--files` a list of PNG paths) and prints the process's resident memory
(VmRSS) every `--every` batches, then the growth from the first batch to the
last. Alongside RSS it prints what could grow: tinygrad's live device memory
(GlobalCounters.mem_used), the number of live tinygrad Buffers, the JITs
tinyclip holds and tinygrad's kernel cache sizes; `--tracemalloc` adds the
Python allocation sites that grew most.

The default checkpoint is a tiny random-init CLIP (the test suite's
"tiny-quick" shape, built with tests.checkpoints.build_checkpoint) so that 10,000
images run in about a minute on two cores; the loop, the buffers and the
caches are the same ones a ViT-B/32 uses.
"""
from __future__ import annotations

import argparse
import gc
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(text=(48, 80, 2, 4), vision=(40, 72, 2, 5, 30, 6), proj=24)   # tests/conftest.py's tiny-quick
FILE_POOL = 64          # --files: distinct PNGs written once and cycled through


def rss_mb() -> float:
    """Resident memory now (VmRSS), in MiB; ru_maxrss is a high-water mark and would hide a drop."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # not Linux: the peak instead


def tinygrad_state(model) -> dict:
    from tinygrad.device import Buffer
    from tinygrad.helpers import GlobalCounters
    state = {"device_mb": GlobalCounters.mem_used / 2**20,
             "buffers": sum(isinstance(o, Buffer) for o in gc.get_objects()),
             "jits": len(model.runner._jits)}
    try:   # tinygrad internals: names change between releases, so only report them when present
        from tinygrad.engine import schedule
        state["schedule_cache"] = len(schedule.schedule_cache)
    except (ImportError, AttributeError):
        pass
    return state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", help="checkpoint folder (default: build a tiny random one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=100, help="images per encode_image call")
    ap.add_argument("--size", type=int, nargs=2, default=(48, 64), metavar=("H", "W"), help="synthetic image size")
    ap.add_argument("--every", type=int, default=10, help="print every N batches")
    ap.add_argument("--files", action="store_true", help="pass PNG paths instead of arrays")
    ap.add_argument("--tracemalloc", action="store_true", help="show the Python allocation sites that grew (its "
                    "snapshot, taken after --every batches, itself adds tens of MiB to the RSS that follows)")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import tinyclip

    work = pathlib.Path(tempfile.mkdtemp(prefix="tinyclip-memory-"))
    folder = pathlib.Path(args.model) if args.model else work / "tiny"
    if not args.model:   # built in a child process, so torch and transformers do not sit in this one's RSS
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.checkpoints import build_checkpoint, clip_config; "
                f"build_checkpoint({str(folder)!r}, clip_config(**{TINY!r}), seed=0)")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    model = tinyclip.load(folder, device=args.device)
    rng = np.random.default_rng(0)
    height, width = args.size
    pool = []
    if args.files:
        from PIL import Image
        for i in range(FILE_POOL):
            pool.append(work / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(pool[-1])

    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start(8)
    batches = -(-args.images // args.batch)
    print(f"{model!r}; {args.images} images of {width}x{height} in {batches} batches of {args.batch} "
          f"({'PNG files' if args.files else 'uint8 arrays'})", flush=True)
    print(f"{'batch':>6} {'images':>7} {'RSS MiB':>8} {'s':>6}  tinygrad", flush=True)
    first = steady = snapshot = None
    done, start, checksum = 0, time.perf_counter(), 0.0
    for b in range(batches):
        n = min(args.batch, args.images - done)
        if args.files:
            images = [pool[(done + i) % FILE_POOL] for i in range(n)]
        else:
            images = list(rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8))
        embeddings = model.encode_image(images)
        checksum += float(embeddings[:, 0].sum())     # use the result, keep nothing
        done += n
        del images, embeddings
        if b == 0:
            gc.collect()
            first = rss_mb()
        if b == min(args.every, batches) - 1:   # the JITs are captured by now (on their second call)
            gc.collect()
            steady = (done, rss_mb(), time.perf_counter())
            if args.tracemalloc:
                snapshot = tracemalloc.take_snapshot()
        if b == 0 or (b + 1) % args.every == 0 or b == batches - 1:
            state = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in tinygrad_state(model).items())
            print(f"{b + 1:>6} {done:>7} {rss_mb():>8.1f} {time.perf_counter() - start:>6.1f}  {state}", flush=True)
    gc.collect()
    last = rss_mb()
    first_n = min(args.batch, args.images)
    steady_n, steady_rss, steady_t = steady
    print(f"RSS after the first batch ({first_n} images) {first:.1f} MiB, after the last ({done} images) "
          f"{last:.1f} MiB: growth {last - first:+.1f} MiB")
    print(f"from image {steady_n} on (JITs captured): {last - steady_rss:+.1f} MiB, "
          f"{(last - steady_rss) / max(1, done - steady_n) * 1000:+.3f} MiB per 1000 images, "
          f"{(done - steady_n) / (time.perf_counter() - steady_t):.0f} images/s; "
          f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB; checksum {checksum:.4f}")
    if args.tracemalloc:
        import tracemalloc
        print(f"Python allocation sites that grew most since image {steady_n}:")
        for stat in tracemalloc.take_snapshot().compare_to(snapshot, "traceback")[:8]:
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  "
                  f"{stat.traceback.format()[-1].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
