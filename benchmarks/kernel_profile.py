#!/usr/bin/env python
"""Where an encoder's time goes: tinygrad's per-kernel times (DEBUG=2), grouped.

    python benchmarks/kernel_profile.py [--model FOLDER] [--batch 1] [--device cpu] [--text LENGTH] [--dtype int8]

Runs one warm forward pass of the vision tower (or, with --text, of the text
tower on a batch of LENGTH tokens) under DEBUG=2, parses
tinygrad's per-kernel lines and prints the kernels that take the most time,
with their GFLOPS, and the total.
"""
import argparse
import collections
import contextlib
import io
import pathlib
import re
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINE = re.compile(r"\*\*\* \S+\s+\d+\s+(?P<name>\S+).*?tm\s+(?P<t>[\d.]+)(?P<unit>us|ms|s)/.*?\(\s*(?P<gflops>\d+) GFLOPS")
SCALE = {"us": 1.0, "ms": 1e3, "s": 1e6}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text", type=int, metavar="LENGTH", help="profile the text tower at this many positions")
    ap.add_argument("--dtype", default=None, help="as tinyclip.load's (float32, float16, int8)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import tinyclip
    from tinygrad import Tensor
    from tinygrad.helpers import Context
    from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config
    folder = pathlib.Path(args.model) if args.model else pathlib.Path(tempfile.gettempdir()) / "tinyclip-bench-vit-b-32"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, clip_config(**ARCHITECTURES["openai/clip-vit-base-patch32"]))
    m = tinyclip.load(folder, device=args.device, dtype=args.dtype)
    s = m.config.vision_config.image_size
    px = np.random.default_rng(0).standard_normal((args.batch, 3, s, s)).astype(np.float32)
    ids = np.random.default_rng(0).integers(1, 1000, (args.batch, args.text or 1)).astype(np.int32)
    tower = f"text tower at {args.text} positions" if args.text else "image tower"
    with m.backend.context():
        if args.text:
            run = lambda: m.model.get_text_features(Tensor(ids, device=m.backend.device)).numpy()
        else:
            run = lambda: m.model.get_image_features(Tensor(px, device=m.backend.device)).numpy()
        run()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), Context(DEBUG=2):
            run()
    kernels = collections.defaultdict(lambda: [0, 0.0, 0])
    for line in ANSI.sub("", buf.getvalue()).splitlines():
        if (k := LINE.search(line)):
            e = kernels[k["name"]]
            e[0] += 1
            e[1] += float(k["t"]) * SCALE[k["unit"]]
            e[2] = int(k["gflops"])
    total = sum(e[1] for e in kernels.values())
    print(f"{tower}, batch {args.batch}, {args.device}: {sum(e[0] for e in kernels.values())} kernel runs, "
          f"{total / 1e3:.0f} ms in kernels")
    print(f"{'kernel':<48} {'runs':>5} {'ms':>9} {'share':>6} {'GFLOPS':>7}")
    for name, (n, us, gf) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"{name:<48} {n:>5} {us / 1e3:>9.1f} {us / total:>6.1%} {gf:>7}")


if __name__ == "__main__":
    main()
