#!/usr/bin/env python
"""tinyclip against transformers on the same GPU, in one process, in a few minutes.

    python benchmarks/speed_gpu.py                       # cuda, float32 and float16, random-init ViT-B/32
    python benchmarks/speed_gpu.py --device cuda --dtype float16 --batches 1,32,256 --repeats 5

For each dtype: images at each batch size (float32 pixel values, and uint8 crops), texts (77 tokens,
and short "a photo of a {label}." prompts) at the largest batch, and the upload of one batch of the
largest size. Two times per row and library, medians of --repeats after a warm-up:
- end to end: host numpy in, host numpy out (tinyclip's encode_*; transformers with the upload, the
  forward and the copy back), what a user waits for;
- device: the forward alone on inputs already on the device, synchronised (tinyclip: the captured
  graph replayed on a device tensor; torch: the forward between two synchronisations).
Prints throughputs and tinyclip/transformers ratios (above 1: tinyclip faster). transformers runs in
float16 by .half(), with float32 inputs cast on the device as its users do.

uint8 crops (N, S, S, 3), as images given as files or arrays go up (tinyclip/pixels.py): tinyclip's
encode_image of the array (crop on the host, staged, uploaded as uint8 from page-locked memory on
CUDA, normalised in the graph) against transformers given the same uint8 on the device, converted
and normalised there by torch (the fastest a transformers user gets; its CLIPImageProcessor on the
host is far slower). Uploads: one batch of uint8 crops and of float32 pixels, synchronised, through
tinyclip's staging (page-locked on CUDA) and tinygrad's own copy-in (pageable), against torch's
.to(device) from pageable and from pinned memory. `--device cpu` runs the
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

        scaling = ours.image_scaling()
        mean = torch.tensor(scaling.mean, device=tdev).reshape(1, 3, 1, 1)
        std = torch.tensor(scaling.std, device=tdev).reshape(1, 3, 1, 1)

        def torch_pixels(u8):
            """uint8 (N, S, S, 3) on the device -> the pixel values, as tinyclip's graph makes them."""
            return ((u8.permute(0, 3, 1, 2).float() * scaling.scale - mean) / std).to(tdtype)

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
                crops = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
                tcrops = torch.from_numpy(crops).to(tdev)
                row(f"images uint8, batch {batch}", batch,
                    lambda: ours.encode_image(crops, batch_size=batch),
                    lambda: features(ref.get_image_features(
                        pixel_values=torch_pixels(torch.from_numpy(crops).to(tdev)))).float().cpu().numpy(),
                    device_run(ours.runner.image_key(batch, scaling), crops),
                    lambda: (ref.get_image_features(pixel_values=torch_pixels(tcrops)), sync()))
            uploads(ours, batches[-1], size, tdev, sync, args.repeats, dtype)
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


def uploads(ours, batch: int, size: int, tdev: str, sync, repeats: int, dtype: str) -> None:
    """One batch of uint8 crops and of float32 pixels onto the device, synchronised: tinyclip's staging
    (page-locked on CUDA), tinygrad's copy-in from pageable memory, torch from pageable and pinned."""
    import torch
    from tinyclip import _tinygrad
    device = ours.backend.device
    for what, np_dtype in (("uint8 crops", np.uint8), ("float32 pixels", np.float32)):
        shape = (batch, size, size, 3) if np_dtype == np.uint8 else (batch, 3, size, size)
        x = np.random.default_rng(1).integers(0, 256, shape).astype(np_dtype)
        with ours.backend.context():
            staging = _tinygrad.Staging(shape, np_dtype, device)
        staging.array[:] = x

        def ours_staged():
            with ours.backend.context():
                staging.upload()
                _tinygrad.synchronize(device)

        def ours_pageable():
            with ours.backend.context():
                _tinygrad.to_tensor(x, device)
                _tinygrad.synchronize(device)
        pageable = torch.from_numpy(x)
        pinned = pageable.pin_memory() if tdev == "cuda" else pageable
        t = [median_seconds(f, repeats) for f in (ours_staged, ours_pageable, lambda: (pageable.to(tdev), sync()),
                                                  lambda: (pinned.to(tdev, non_blocking=True), sync()))]
        mb = x.nbytes / 1e6
        print(f"{dtype} upload {what}, batch {batch} ({mb:.0f} MB): tinyclip staging ({staging.kind}) "
              f"{mb / t[0]:8.0f} MB/s, tinygrad copy-in {mb / t[1]:8.0f} MB/s | torch pageable {mb / t[2]:8.0f} MB/s, "
              f"pinned {mb / t[3]:8.0f} MB/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
