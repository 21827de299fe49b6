#!/usr/bin/env python
"""tinyclip against transformers on the same machine, same checkpoint, same process.

    python benchmarks/speed.py                      # random-init ViT-B/32 built locally, cpu backend
    python benchmarks/speed.py --model FOLDER --device cpu-llvm --repeats 5
    python benchmarks/speed.py --isa avx2           # both libraries held to AVX2 (like for like on a wider CPU)
    python benchmarks/speed.py --dtype bfloat16     # tinyclip bfloat16 against tinyclip float32 and torch bfloat16
    python benchmarks/speed.py --dtype int8         # tinyclip int8 vs tinyclip float32 vs torch's dynamic int8

Prints median throughputs and the tinyclip/transformers ratio (above 1 means
tinyclip is faster) for: images at batch 1 and 32, texts at batch 32 on
realistic prompts ("a photo of a {label}.", transformers padded to the
longest as its tokenizer does with padding=True); then the time a fresh
process takes to import, load and give its first image embedding, with
tinygrad's kernel cache and tinyclip's graph cache cold (new, empty) and warm,
and each process's peak RSS. Runs alternate between the two libraries so drift
hits both; transformers' files are in the OS page cache for both.

It also times the hottest matmul (ViT-B/32's fc1 at batch 32: 1600x768 @ 768x3072) in both libraries
and prints its GFLOPS as a share of this machine's FMA peak on the same instruction set
(benchmarks/fma_peak.py). `--isa avx2` runs the whole comparison in a child process whose environment
holds torch to AVX2 (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY: read when torch
is imported) and tinyclip to its AVX2 kernels (TINYCLIP_CPU_ISA=avx2).

`--dtype bfloat16` compares, in one run and in turns, tinyclip with bfloat16 linear layers, tinyclip in
float32 and transformers' model converted with `model.to(torch.bfloat16)` (images and texts at batch 32),
prints the throughputs with bfloat16's ratio to each, the embeddings' lowest cosine against tinyclip
float32, and the hot matmul in both of tinyclip's dtypes.

`--dtype int8` compares, in one run, tinyclip int8 (load(dtype="int8")), tinyclip float32 and transformers
with torch's dynamic int8 quantisation of its Linear layers (torch.ao.quantization.quantize_dynamic, qint8
weights, activations quantised per batch at run time) at batch 32, images and texts, and prints int8's
exactness against transformers in float32: the minimum cosine of the image and text embeddings, and the
share of images whose zero-shot top-1 among INT8_LABELS (CIFAR-100's 100 classes, "a photo of a {}.") is
float32's. The images are views (crops, flips) of the photographs in tests/data/images, or with `--photos
DIR` the photographs in DIR, each whole (the issue's real-photo set, with released weights via --model).
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

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
LABELS = ["cat", "dog", "car", "airplane", "horse", "ship", "truck", "bird", "frog", "deer", "astronaut",
          "rocket", "cup of coffee", "camera", "tree", "house"]

AVX2_TORCH = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
HOT_MATMUL = (1600, 768, 3072)    # ViT-B/32's fc1 at batch 32: rows, inputs, outputs
INT8_LABELS = (   # CIFAR-100's classes: 100 labels for the int8 top-1 figure
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain", "mouse", "mushroom", "oak tree", "orange",
    "orchid", "otter", "palm tree", "pear", "pickup truck", "pine tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow tree", "wolf", "woman", "worm")

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
lib, folder, device = sys.argv[1], sys.argv[2], sys.argv[3]
import numpy as np
pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
if lib == "tinyclip":
    import tinyclip
    m = tinyclip.load(folder, device=device)
    m.encode_image(pixels)
else:
    import torch, transformers
    m = transformers.CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        m.get_image_features(pixel_values=torch.from_numpy(pixels))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent process.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": hwm / 1024}))
"""


def alternating(*fns_and_repeats):
    """alternating(fn_a, fn_b, ..., repeats): the median seconds of each fn, run in turns (a, b, a, b, ...)
    after one warm-up each (compile, capture the JIT), so that drift in the machine's speed hits all alike."""
    *fns, repeats = fns_and_repeats
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, taken in zip(fns, times):
            t = time.perf_counter()
            fn()
            taken.append(time.perf_counter() - t)
    return tuple(statistics.median(taken) for taken in times)


def fresh_process(lib, folder, device, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", CHILD, lib, str(folder), device], env=env, capture_output=True,
                       text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"{lib} child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a random-init ViT-B/32 built once in a temp dir)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-start", action="store_true", help="skip the fresh-process start-up measurements")
    ap.add_argument("--only-start", action="store_true", help="only the fresh-process start-up measurements")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: hold both libraries to AVX2 (default: each uses the widest this CPU has)")
    ap.add_argument("--photos", help="--dtype int8: a folder of real photographs (.jpg, .jpeg, .png) for the top-1 "
                    "check, whole (default: views of the photographs in tests/data/images)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "int8"], default="float32",
                    help="bfloat16: tinyclip bfloat16 against tinyclip float32 and torch bfloat16, batch 32; int8: tinyclip "
                    "int8 against tinyclip float32 and torch's quantize_dynamic, and int8's exactness")
    args = ap.parse_args(argv)
    if args.isa == "avx2" and os.environ.get("TINYCLIP_CPU_ISA") != "avx2":
        # torch reads these when it is imported: the comparison runs again in a child with them set.
        env = dict(os.environ, TINYCLIP_CPU_ISA="avx2", **AVX2_TORCH)
        return subprocess.run([sys.executable, *sys.argv], env=env).returncode

    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    import tinyclip
    from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config

    folder = pathlib.Path(args.model) if args.model else pathlib.Path(tempfile.gettempdir()) / "tinyclip-bench-vit-b-32"
    if not (folder / "config.json").exists():
        build_checkpoint(folder, clip_config(**ARCHITECTURES["openai/clip-vit-base-patch32"]))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads, {torch.backends.cpu.get_cpu_capability()}), transformers {transformers.__version__}; tinyclip on "
          f"{args.device}; checkpoint {folder}")

    if args.only_start:
        return start_up(folder, args)
    if args.dtype == "int8":
        return int8_comparison(folder, args)
    if args.dtype != "float32":
        return low_precision(folder, args, tinyclip, torch, transformers)
    ours = tinyclip.load(folder, device=args.device)
    print(f"tinyclip kernels: {ours.model.kernels.describe()}"
          + (f"; {ours.model.kernels.machine}" if hasattr(ours.model.kernels, "machine") else ""))
    ref = transformers.CLIPModel.from_pretrained(folder).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    prompts = [f"a photo of a {LABELS[i % len(LABELS)]}." for i in range(32)]
    rows = []

    def bench(name, unit_count, run_ours, run_ref):
        t_ours, t_ref = alternating(run_ours, run_ref, args.repeats)
        rows.append((name, unit_count / t_ours, unit_count / t_ref))
        print(f"{name:<22} tinyclip {unit_count / t_ours:8.2f}/s   transformers {unit_count / t_ref:8.2f}/s   "
              f"ratio {t_ref / t_ours:5.2f}x", flush=True)

    with torch.no_grad():
        for batch in (1, 32):
            px = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
            bench(f"images, batch {batch}", batch, lambda: ours.encode_image(px, batch_size=batch),
                  lambda: ref.get_image_features(pixel_values=torch.from_numpy(px)))
        ids = ours.tokenize(prompts)
        ref_ids = tok(prompts, padding=True, return_tensors="pt")["input_ids"]
        bench("texts, batch 32", 32, lambda: ours.encode_text(ids, batch_size=32),
              lambda: ref.get_text_features(input_ids=ref_ids))

        hot_matmul(ours, torch, args.repeats)

    if not args.skip_start:
        start_up(folder, args)
    return 0


def low_precision(folder, args, tinyclip, torch, transformers) -> int:
    """tinyclip in args.dtype against tinyclip float32 and torch in the same dtype, images and texts at batch 32."""
    low = tinyclip.load(folder, device=args.device, dtype=args.dtype)
    exact = tinyclip.load(folder, device=args.device)
    print(f"tinyclip kernels: {low.model.kernels.describe()}; {low.model.kernels.machine}")
    ref = transformers.CLIPModel.from_pretrained(folder).eval().to(getattr(torch, args.dtype))
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    prompts = [f"a photo of a {LABELS[i % len(LABELS)]}." for i in range(32)]
    px = rng.standard_normal((32, 3, 224, 224)).astype(np.float32)
    ids = low.tokenize(prompts)
    ref_ids = tok(prompts, padding=True, return_tensors="pt")["input_ids"]
    tpx = torch.from_numpy(px).to(getattr(torch, args.dtype))
    cases = (("images, batch 32", lambda m: m.encode_image(px, batch_size=32),
              lambda: ref.get_image_features(pixel_values=tpx)),
             ("texts, batch 32", lambda m: m.encode_text(ids, batch_size=32),
              lambda: ref.get_text_features(input_ids=ref_ids)))
    with torch.no_grad():
        for name, ours, theirs in cases:
            t_low, t_exact, t_ref = alternating(lambda: ours(low), lambda: ours(exact), theirs, args.repeats)
            a, b = ours(low), ours(exact)
            cosine = float(np.min((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
            print(f"{name:<18} tinyclip {args.dtype} {32 / t_low:7.2f}/s   tinyclip float32 {32 / t_exact:7.2f}/s   "
                  f"torch {args.dtype} {32 / t_ref:7.2f}/s   {args.dtype}/float32 {t_exact / t_low:5.2f}x   "
                  f"tinyclip/torch {t_ref / t_low:5.2f}x   lowest cosine to float32 {cosine:.6f}", flush=True)
        for model in (low, exact):
            hot_matmul(model, torch, args.repeats, torch_dtype=getattr(torch, args.dtype))
    return 0


def int8_comparison(folder, args) -> int:
    """tinyclip int8, tinyclip float32 and torch's dynamic int8 at batch 32, then int8's exactness."""
    import copy

    import torch
    import transformers
    from PIL import Image, ImageOps

    import tinyclip
    f32 = tinyclip.load(folder, device=args.device)
    i8 = tinyclip.load(folder, device=args.device, dtype="int8")
    print(f"tinyclip kernels: {i8.model.kernels.describe()}")
    ref = transformers.CLIPModel.from_pretrained(folder).eval()
    tq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(ref), {torch.nn.Linear}, dtype=torch.qint8)
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    rng = np.random.default_rng(0)
    size = f32.config.vision_config.image_size
    px = rng.standard_normal((32, 3, size, size)).astype(np.float32)
    prompts = [f"a photo of a {INT8_LABELS[i]}." for i in range(32)]
    ids, ref_ids = f32.tokenize(prompts), tok(prompts, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for name, units, runs in (
                ("images, batch 32", 32, (lambda: i8.encode_image(px), lambda: f32.encode_image(px),
                                          lambda: tq.get_image_features(pixel_values=torch.from_numpy(px)))),
                ("texts, batch 32", 32, (lambda: i8.encode_text(ids), lambda: f32.encode_text(ids),
                                         lambda: tq.get_text_features(input_ids=ref_ids)))):
            t_i8, t_f32, t_tq = round_robin(runs, args.repeats)
            print(f"{name:<18} tinyclip int8 {units / t_i8:7.2f}/s   tinyclip float32 {units / t_f32:7.2f}/s   "
                  f"torch quantize_dynamic {units / t_tq:7.2f}/s   int8/float32 {t_f32 / t_i8:4.2f}x (target >= 2.5)   "
                  f"int8/torch int8 {t_tq / t_i8:4.2f}x", flush=True)

        views = []
        if args.photos:      # a real-photo set: each photograph once, whole
            photos = sorted(q for q in pathlib.Path(args.photos).iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))
            if not photos:
                raise SystemExit(f"--photos {args.photos}: no .jpg, .jpeg or .png file there")
            views = [Image.open(q).convert("RGB") for q in photos]
            seen = f"{len(views)} photographs in {args.photos}"
        else:
            photos = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
            for q in photos:      # each photograph whole and as crops of it, each also mirrored
                im = Image.open(q).convert("RGB")
                w, h = im.size
                for box in ((0, 0, w, h), (0, 0, w * 3 // 4, h * 3 // 4), (w // 4, h // 4, w, h), (w // 8, h // 8, w * 7 // 8, h * 7 // 8)):
                    crop = im.crop(box)
                    views += [crop, ImageOps.mirror(crop)]
            seen = f"{len(views)} views (crops, mirrored) of the {len(photos)} photographs in tests/data/images"
        pixels = f32.preprocess(views)
        label_ids = f32.tokenize([f"a photo of a {label}." for label in INT8_LABELS])
        want_img = _features(ref.get_image_features(pixel_values=torch.from_numpy(pixels)))
        want_txt = _features(ref.get_text_features(input_ids=torch.from_numpy(label_ids.astype(np.int64))))
        torch_img = _features(tq.get_image_features(pixel_values=torch.from_numpy(pixels)))
        torch_txt = _features(tq.get_text_features(input_ids=torch.from_numpy(label_ids.astype(np.int64))))
    top1 = lambda img, txt: (_unit(img) @ _unit(txt).T).argmax(1)    # noqa: E731
    want = top1(want_img, want_txt)
    print(f"int8 exactness against transformers float32 on {seen}, {len(INT8_LABELS)} labels (CIFAR-100):")
    for name, img, txt in (("tinyclip int8", i8.encode_image(pixels), i8.encode_text(label_ids)),
                           ("torch quantize_dynamic", torch_img, torch_txt)):
        print(f"  {name:<23} cosine min: images {_cos(img, want_img).min():.5f}, texts {_cos(txt, want_txt).min():.5f} "
              f"(tolerance >= 0.995); top-1 unchanged {np.mean(top1(img, txt) == want):.1%} (tolerance >= 99%)")
    return 0


def round_robin(fns, repeats):
    """Median seconds of each of fns, run in turns after one warm-up each (see alternating)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _features(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().float().numpy()


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cos(a, b):
    return (_unit(a) * _unit(b)).sum(-1)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def hot_matmul(ours, torch, repeats, torch_dtype=None) -> None:
    """fc1's shape in tinyclip's kernel set (JIT-replayed: the kernel's time, not scheduling) and in torch
    (in torch_dtype, default float32), GFLOPS and share of the float32 FMA peak on the instruction set each runs."""
    from tinygrad import Tensor
    from tinyclip import _tinygrad
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fma_peak
    M, K, N = HOT_MATMUL
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(shape).astype(np.float32) for shape in ((M, K), (N, K), (N,)))
    kernels, device = ours.model.kernels, ours.backend.device
    with ours.backend.context():
        weight = kernels.prepare_linear(Tensor(w, device=device).realize())
        bias, inp = Tensor(b, device=device).realize(), Tensor(x, device=device).realize()
        run = _tinygrad.new_jit(lambda t: kernels.linear(t, weight, bias).realize())
        tx, tw, tb = (torch.from_numpy(a).to(torch_dtype or torch.float32) for a in (x, w, b))
        t_ours, t_ref = alternating(lambda: run(inp), lambda: torch.nn.functional.linear(tx, tw, tb), max(repeats, 5))
    isa = getattr(getattr(kernels, "isa", None), "name", "avx2")
    peak = fma_peak.peak_gflops("avx2" if os.environ.get("TINYCLIP_CPU_ISA") == "avx2" else isa, os.cpu_count())
    flops = 2 * M * N * K
    print(f"hot matmul {M}x{K} @ {K}x{N}: tinyclip {ours.dtype} {flops / t_ours / 1e9:.0f} GFLOPS "
          f"({flops / t_ours / 1e9 / peak:.0%} of the {peak:.0f} GFLOPS float32 FMA peak), torch "
          f"{str(torch_dtype or torch.float32).replace('torch.', '')} "
          f"{flops / t_ref / 1e9:.0f} GFLOPS ({flops / t_ref / 1e9 / peak:.0%})", flush=True)


def start_up(folder, args) -> int:
    """Fresh processes, caches in a new temp dir: the first tinyclip process fills tinygrad's
    kernel cache and tinyclip's graph cache (cold); the next ones find both (warm)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {"CACHEDB": os.path.join(tmp, "kernels.db"), "TINYCLIP_CACHE_DIR": os.path.join(tmp, "tinyclip")}
        for label, runs in (("cold caches", 1), ("warm caches", args.repeats)):
            pairs = [(fresh_process("tinyclip", folder, args.device, env),
                      fresh_process("transformers", folder, args.device)) for _ in range(runs)]
            a = statistics.median(p[0]["seconds"] for p in pairs)
            b = statistics.median(p[1]["seconds"] for p in pairs)
            rss_a = max(p[0]["peak_rss_mb"] for p in pairs)
            rss_b = max(p[1]["peak_rss_mb"] for p in pairs)
            print(f"fresh start, {label:<12} tinyclip {a:6.1f}s   transformers {b:6.1f}s   "
                  f"ratio {a / b:5.2f} (target <= 0.5)   peak RSS {rss_a:.0f} MB vs {rss_b:.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
