#!/usr/bin/env python
"""tinyclip against transformers on the same GPU, in one process, in a few minutes.

    python benchmarks/speed_gpu.py                       # cuda, float32 and float16, random-init ViT-B/32
    python benchmarks/speed_gpu.py --device cuda --dtype float16 --batches 1,32,256 --repeats 5

For each dtype: images at each batch size and texts (77 tokens, and short "a photo of a {label}."
prompts) at the largest batch. Two times per row and library, medians of --repeats after a warm-up:
- end to end: host numpy in, host numpy out (tinyclip's encode_*; transformers with the upload, the
  forward and the copy back), what a user waits for;
- device: the forward alone on inputs already on the device, synchronised (tinyclip: the captured
  graph replayed on a device tensor; torch: the forward between two synchronisations).
Prints throughputs and tinyclip/transformers ratios (above 1: tinyclip faster). transformers runs in
float16 by .half(), with float32 inputs cast on the device as its users do. `--device cpu` runs the
same on the CPU (small batches), to check the script itself.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config  # noqa: E402

LABELS = ["cat", "dog", "car", "airplane", "horse", "ship", "truck", "bird", "frog", "deer"]
TORCH_DEVICE = {"cuda": "cuda", "nv": "cuda", "cpu": "cpu", "cpu-llvm": "cpu", "metal": "mps"}


def features(out):
    """transformers 5 returns an output object whose pooler_output holds the projected features; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def median_seconds(fn, repeats: int) -> float:
    fn()   # warm-up: compile, capture
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: a random-init ViT-B/32 built in a temp dir)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", action="append", choices=["float32", "float16"])
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import pathlib
    import tempfile

    import torch
    import transformers
    from tinygrad import Tensor

    import tinyclip
    from tinyclip import _tinygrad

    folder = pathlib.Path(args.model) if args.model else pathlib.Path(tempfile.gettempdir()) / "tinyclip-bench-vit-b-32"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, clip_config(**ARCHITECTURES["openai/clip-vit-base-patch32"]))
    batches = [int(b) for b in args.batches.split(",")]
    tdev = TORCH_DEVICE.get(args.device, args.device)
    sync = torch.cuda.synchronize if tdev == "cuda" else (lambda: None)
    print(f"device {args.device} (torch {tdev}: {torch.cuda.get_device_name() if tdev == 'cuda' else 'cpu'}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}; checkpoint {folder}", flush=True)
    rng = np.random.default_rng(0)
    for dtype in args.dtype or ["float32", "float16"]:
        ours = tinyclip.load(folder, device=args.device, dtype=dtype)
        ref = transformers.CLIPModel.from_pretrained(folder).eval().to(tdev)
        ref = ref.half() if dtype == "float16" else ref
        tdtype = torch.float16 if dtype == "float16" else torch.float32
        tok = transformers.CLIPTokenizer.from_pretrained(folder)
        size = ours.config.vision_config.image_size
        rows = []

        def row(name, count, ours_e2e, ref_e2e, ours_dev, ref_dev):
            t = [median_seconds(f, args.repeats) for f in (ours_e2e, ref_e2e, ours_dev, ref_dev)]
            rows.append(name)
            print(f"{dtype} {name:<26} end to end: tinyclip {count / t[0]:9.1f}/s transformers {count / t[1]:9.1f}/s "
                  f"ratio {t[1] / t[0]:5.2f}x | device: tinyclip {count / t[2]:9.1f}/s transformers "
                  f"{count / t[3]:9.1f}/s ratio {t[3] / t[2]:5.2f}x", flush=True)

        def device_run(kind, x):
            """The runner's captured graph for this input, replayed on a device tensor, synchronised."""
            ours.runner._run(kind, x)                           # captures (or loads) the graph for this shape
            jit = ours.runner._jits[kind]
            with ours.backend.context():
                t = Tensor(x, device=ours.backend.device).realize()

            def run():
                with ours.backend.context():
                    jit(t)
                    _tinygrad.synchronize(ours.backend.device)
            return run

        with torch.no_grad():
            for batch in batches:
                px = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
                tpx = torch.from_numpy(px).to(tdev).to(tdtype)
                row(f"images, batch {batch}", batch,
                    lambda: ours.encode_image(px, batch_size=batch),
                    lambda: features(ref.get_image_features(
                        pixel_values=torch.from_numpy(px).to(tdev).to(tdtype))).float().cpu().numpy(),
                    device_run(("image", batch), px),
                    lambda: (ref.get_image_features(pixel_values=tpx), sync()))
            batch = batches[-1]
            for name, texts in (("texts x 77 tokens", ["x " * 80] * batch),
                                ("texts, short prompts", [f"a photo of a {LABELS[i % len(LABELS)]}." for i in range(batch)])):
                ids = ours.tokenize(texts)
                ref_ids = tok(texts, padding=True, truncation=True, return_tensors="pt",
                              max_length=ours.config.text_config.max_position_embeddings)["input_ids"]
                tids = ref_ids.to(tdev)
                length = ours.runner.text_length(ids)
                row(f"{name}, batch {batch}", batch,
                    lambda: ours.encode_text(ids, batch_size=batch),
                    lambda: features(ref.get_text_features(input_ids=ref_ids.to(tdev))).float().cpu().numpy(),
                    device_run(("text", batch, length), ids[:, :length].astype(np.int32)),
                    lambda: (ref.get_text_features(input_ids=tids), sync()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
