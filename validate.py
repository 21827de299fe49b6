#!/usr/bin/env python
"""Check tinyclip against transformers on one checkpoint, on every available backend.

    python validate.py                                   # openai/clip-vit-base-patch32, all backends
    python validate.py --model path/to/folder --device cpu --device opencl
    python validate.py --images a.jpg b.png --texts "a cat" "a dog" --dtype float16
    python validate.py --dtype bfloat16                  # the cpu backend's bfloat16 linear layers
    python validate.py --device cpu --dtype int8        # tolerances, not exactness: cosine and top-1

For each backend it compares tokens (exact), pixels, image and text
embeddings and logits with transformers' CLIPTokenizer, CLIPImageProcessor
and CLIPModel (for an open_clip folder: with open_clip's get_tokenizer,
create_model_and_transforms and model, run in .venv-openclip), prints one
row per backend (max abs error, max relative error = max|ours - theirs| /
max|theirs|, minimum cosine, whether each image ranks the texts in the same
order by logits) and exits 1 when any figure is beyond tolerance.

The tolerances are bounds, not exactness: float32 is exact to float32 rounding; float16 and bfloat16 (the
linear layers' inputs rounded to 8 bits of mantissa, sums in float32) are held to every embedding's
cosine with transformers' float32 (>= 0.9999 and >= 0.999) and, for bfloat16, to logits that rank the
texts the same for every image (its relative error is shown, not bounded). With --dtype bfloat16 the
default backends are those that run it (the cpu backend on a CPU with avx512_bf16).

When the hub cannot be reached and the model is not cached, it says so and
validates on a locally built checkpoint of the same architecture with random
weights (transformers' own initialisation): the numbers then prove tinyclip
computes what transformers computes, not anything about the released weights.
"""
from __future__ import annotations

import argparse
import atexit
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

import numpy as np

from tests.checkpoints import ARCHITECTURES, build_checkpoint, clip_config

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_IMAGES = sorted((ROOT / "tests" / "data" / "images").glob("*.[pj][np]g"))
DEFAULT_TEXTS = ["a photo of a cat", "a photo of a dog", "an astronaut in a white suit", "a cup of coffee",
                 "a rocket launching at night", "a horse", "a man with a camera", "", "A PHOTO of 2 cats & 1 dog!"]
# Relative tolerances (max |ours - theirs| / max |theirs|; None: shown, not bounded) and minimum cosine per dtype,
# against transformers in float32. They are tolerances: only float32 is exact (to float32 rounding). bfloat16 and
# int8 compute the linear layers only in that dtype (README: "bfloat16 on the CPU", "int8 on the CPU").
TOLERANCE = {"float32": (1e-5, 0.999999), "float16": (1e-2, 0.9999), "bfloat16": (None, 0.999), "int8": (None, 0.995)}
# dtypes held to logits that rank the texts in the same order for every image as transformers' float32 do
SAME_RANKS = ("bfloat16",)
# the share of images whose first-ranked text (zero-shot top-1 among --texts) must be transformers' first
TOP1_TOLERANCE = {"int8": 0.99}
# float32 with TF32 matmuls (--tf32): TF32 rounds each matmul input to float16's 10-bit mantissa and
# adds in float32, so float16's bounds.
TF32_TOLERANCE = TOLERANCE["float16"]
PIXEL_ATOL = 1e-5


def features(out):
    """transformers 5 returns an output object (.pooler_output is the projection); older versions a tensor."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).detach().float().numpy()


def compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float, float]:
    ours, theirs = ours.astype(np.float64), theirs.astype(np.float64)
    diff = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    rel = diff / max(float(np.abs(theirs).max()), 1e-30)
    flat_o, flat_t = ours.reshape(len(ours), -1), theirs.reshape(len(theirs), -1)
    cos = float(np.min(np.sum(flat_o * flat_t, 1) / (np.linalg.norm(flat_o, axis=1) * np.linalg.norm(flat_t, axis=1))))
    return diff, rel, cos


def swapped(ours: np.ndarray, theirs: np.ndarray) -> tuple[int, float]:
    """(how many rows (an image's logits over the texts) order some two texts otherwise than `theirs` do, the
    widest gap in `theirs` between two texts so swapped): (0, 0.0) when every image ranks the texts alike."""
    flipped = np.sign(ours[:, :, None] - ours[:, None, :]) != np.sign(theirs[:, :, None] - theirs[:, None, :])
    gaps = np.abs(theirs[:, :, None] - theirs[:, None, :])[flipped]
    return int(flipped.any(axis=(1, 2)).sum()), float(gaps.max()) if gaps.size else 0.0


def resolve_model(name: str) -> tuple[pathlib.Path, str]:
    """(folder, note): the checkpoint, or a locally built random one of the same architecture."""
    from tinyclip import hub
    from tinyclip.errors import CheckpointNotFoundError
    try:
        return hub.locate(name), ""
    except CheckpointNotFoundError as e:
        if name not in ARCHITECTURES:
            raise
        reason = str(e).split(". ")[0]
    folder = pathlib.Path(tempfile.mkdtemp(prefix="tinyclip-validate-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)     # ~600 MB of random weights
    print(f"NOTE: {reason}.\n      Validating on a locally built checkpoint with the architecture of {name} and "
          "RANDOM weights\n      (transformers' initialisation): NOT the released weights.", flush=True)
    build_checkpoint(folder, clip_config(**ARCHITECTURES[name]))
    return folder, f"random-init {name} architecture"


def openclip_reference(folder: pathlib.Path, images: list[str], texts: list[str]):
    """(ids, pixels, image, text features, logits) from open_clip itself, which runs in
    .venv-openclip (made by `bash .ci/run`; see tests/openclip_oracle.py) as a subprocess."""
    import json
    import subprocess
    python = ROOT / ".venv-openclip" / "bin" / "python"
    if not python.exists():
        sys.exit(f"{folder} is an open_clip checkpoint; its oracle, open_clip, runs in {python.parent.parent}, "
                 "which is missing: run `bash .ci/run` once to create it")
    with tempfile.TemporaryDirectory(prefix="tinyclip-validate-") as work:
        job = pathlib.Path(work) / "job.json"
        job.write_text(json.dumps([{"kind": "answer", "folder": str(folder), "texts": texts,
                                    "images": [str(pathlib.Path(p).resolve()) for p in images],
                                    "out": str(pathlib.Path(work) / "ref.npz")}]))
        subprocess.run([str(python), str(ROOT / "tests" / "openclip_oracle.py"), str(job)], check=True, cwd=ROOT)
        ref = np.load(pathlib.Path(work) / "ref.npz")
        return (ref["tokens"], ref["pixels"], ref["image_embeds"], ref["text_embeds"],
                ref["logits"].astype(np.float32))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default="openai/clip-vit-base-patch32", help="hub id or local folder")
    ap.add_argument("--device", action="append", help="backend name or tinygrad device (repeatable); "
                    "default: every available backend")
    ap.add_argument("--images", nargs="+", default=[str(p) for p in DEFAULT_IMAGES], help="image files")
    ap.add_argument("--texts", nargs="+", default=DEFAULT_TEXTS, help="texts")
    ap.add_argument("--dtype", default="float32", choices=sorted(TOLERANCE))
    ap.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (cuda, nv), "
                    "checked to float16's tolerance; other backends warn and run exact float32")
    args = ap.parse_args(argv)
    if args.tf32 and args.dtype != "float32":
        ap.error("--tf32 applies to --dtype float32")
    import tinyclip
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning     # tinyclip's warnings (--tf32 on a CPU ...) as one line each
        try:
            return _validate(args, *_checked(args))
        except tinyclip.TinyClipError as e:
            print(f"validate.py: error: {e}", file=sys.stderr)
            return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"validate.py: warning: {message}", file=file or sys.stderr)


def _checked(args):
    """(images, folder, note): the arguments checked before the reference runs (a minute for transformers),
    each failure one line (a TinyClipError)."""
    from tinyclip import registry
    from tinyclip.errors import BackendError
    from tinyclip.preprocess import load_image
    for name in args.device or []:
        try:
            backend = registry.select(name)
            backend.check_dtype(args.dtype)
        except BackendError as e:
            raise BackendError(f"--device {name}: {e}") from None
    images = [load_image(p) for p in args.images]     # a missing or damaged file: one line naming it
    folder, note = resolve_model(args.model)
    return images, folder, note


def _validate(args, images, folder, note) -> int:
    import torch
    import transformers

    import tinyclip
    from tinyclip import checkpoints, registry

    t0 = time.perf_counter()
    if checkpoints.open(folder).format == "open_clip":
        ids, pixels, ref_img, ref_txt, ref_logits = openclip_reference(folder, args.images, args.texts)
        print(f"open_clip reference (.venv-openclip): {time.perf_counter() - t0:.1f}s", flush=True)
    else:
        ref = transformers.CLIPModel.from_pretrained(folder).eval()
        ref_tok = transformers.CLIPTokenizer.from_pretrained(folder)
        ref_proc = transformers.CLIPImageProcessor.from_pretrained(folder)
        context = ref.config.text_config.max_position_embeddings
        ids = ref_tok(args.texts, padding="max_length", max_length=context, truncation=True,
                      return_tensors="np")["input_ids"]
        pixels = ref_proc(images, return_tensors="np")["pixel_values"]
        with torch.no_grad():
            ref_img = features(ref.get_image_features(pixel_values=torch.from_numpy(pixels)))
            ref_txt = features(ref.get_text_features(input_ids=torch.from_numpy(ids)))
            ref_logits = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels)) \
                .logits_per_image.float().numpy()
        print(f"transformers {transformers.__version__} (torch {torch.__version__}) reference: "
              f"{time.perf_counter() - t0:.1f}s", flush=True)

    runs = [b for b in registry.registered() if b.available and args.dtype in b.usable_dtypes]
    devices = args.device or [b.name for b in runs]
    unavailable = [f"{b.name} ({b.unavailable or 'does not run ' + args.dtype + ' here'})"
                   for b in registry.registered() if b not in runs]
    rel_tol, cos_tol = TF32_TOLERANCE if args.tf32 else TOLERANCE[args.dtype]
    print(f"model: {args.model}{' [' + note + ']' if note else ''}  folder: {folder}")
    relative = "relative shown" if rel_tol is None else f"relative <= {rel_tol:g}"
    ranks = ", logits rank the texts the same for every image" if args.dtype in SAME_RANKS else ""
    top1_tol = TOP1_TOLERANCE.get(args.dtype)
    ranks += f", top-1 text unchanged for >= {top1_tol:.0%} of images" if top1_tol else ""
    print(f"{len(images)} images, {len(args.texts)} texts, dtype {args.dtype}{' (TF32 matmuls)' if args.tf32 else ''}; "
          f"tolerance: {relative}, cosine >= {cos_tol}{ranks}, pixels <= {PIXEL_ATOL:g} abs, tokens exact")
    if unavailable and not args.device:
        print("not available here: " + "; ".join(unavailable))
    header = f"{'backend':<10} {'device':<9} {'tokens':>8} {'pixels':>9} " + \
        " ".join(f"{n + ' abs':>11} {n + ' rel':>10} {'cos':>9}" for n in ("image", "text", "logits")) + \
        f" {'ranks':>6}" + (f" {'top-1':>6}" if top1_tol else "") + "  result"
    print(header)
    print("-" * len(header))
    failed = False
    for name in devices:
        try:
            t0 = time.perf_counter()
            model = tinyclip.load(folder, device=name, dtype=args.dtype, allow_tf32=args.tf32)
            our_ids = model.tokenize(args.texts)
            our_pixels = model.preprocess(images)
            img, txt = model.encode_image(our_pixels), model.encode_text(our_ids)
            logits = model.logits_from_embeddings(img, txt)
        except tinyclip.TinyClipError as e:
            print(f"{name:<10} error: {e}")
            failed = True
            continue
        token_errors = int((our_ids != ids).sum())
        pixel_err = float(np.abs(our_pixels - pixels).max())
        cells, ok = [], token_errors == 0 and pixel_err <= PIXEL_ATOL
        for ours, theirs in ((img, ref_img), (txt, ref_txt), (logits, ref_logits)):
            diff, rel, cos = compare(ours, theirs)
            ok &= (rel_tol is None or rel <= rel_tol) and cos >= cos_tol
            cells.append(f"{diff:>11.2e} {rel:>10.2e} {cos:>9.6f}")
        rows, gap = swapped(logits, ref_logits)
        ok &= not rows or args.dtype not in SAME_RANKS
        cells.append(f"{'same':>6}" if not rows else f"differ ({rows} of {len(logits)} images; swapped texts {gap:.1e} "
                     "apart in the reference)")
        if top1_tol:
            same = float(np.mean(logits.argmax(1) == ref_logits.argmax(1))) if len(logits) else 1.0
            ok &= same >= top1_tol
            cells.append(f"{same:>6.1%}")
        failed |= not ok
        print(f"{model.device:<10} {registry.shown_device(model.backend):<9} {token_errors:>8d} {pixel_err:>9.1e} {' '.join(cells)}  "
              f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    print("FAILED: beyond tolerance" if failed else "all backends within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
