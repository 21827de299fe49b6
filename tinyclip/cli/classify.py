"""`tinyclip classify`: zero-shot classification of image files over labels.

Arguments are checked before the model loads (which takes seconds), so a typo fails at once
with one line; the work itself lives in tinyclip.tasks.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from .. import tasks
from ..errors import ImageError, UsageError
from ..preprocess import load_image
from . import add_model_options, check_batch_size, load_model, print_json
from .lines import read_lines

CLASSIFY_EPILOG = """\
examples:
  tinyclip classify cat.jpg dog.png --labels cat dog "hot-air balloon"
  tinyclip classify photos/*.jpg --labels cat dog --top 1 --json
  tinyclip classify cat.jpg --labels cat dog --templates none      # the labels are the prompts
  tinyclip classify cat.jpg --labels cat dog --templates my.txt    # one template per line, "{}" = label

Put --labels after the images: it takes every word that follows. Probabilities
are softmax(exp(logit_scale) * cosine) over the labels, each label's text
embedding ensembled over the templates (default: OpenAI's 80 ImageNet prompts).
--json prints [{"image": PATH, "scores": {LABEL: PROBABILITY, ...}}, ...], best first.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("classify", help="zero-shot classification of images over labels",
                              description="Zero-shot classification: the probability of each label per image.",
                              epilog=CLASSIFY_EPILOG, formatter_class=fmt)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    # nargs="*" and checked in run_classify, so a missing label list is a one-line error like the others
    p.add_argument("--labels", nargs="*", metavar="LABEL", default=[], help="the class names (required)")
    p.add_argument("--templates", default="imagenet", metavar="imagenet|none|FILE",
                   help="prompt templates: OpenAI's 80 ImageNet prompts (default), none (the labels as "
                        "given), or a file with one template per line containing {}")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show the K best labels per image "
                   "(default: all)")
    add_model_options(p)
    p.set_defaults(run=run_classify)


def run_classify(args) -> int:
    if not args.labels:
        raise UsageError("no labels: give the class names with --labels L1 L2 ... (after the images)")
    labels = tasks.check_labels(args.labels)
    top = tasks.check_top(args.top, allow_none=True, name="--top")
    templates = _templates_option(args.templates)
    batch_size = check_batch_size(args)
    for path in args.images:
        _check_image_file(path)
    model = load_model(args)

    results = []
    for i in range(0, len(args.images), batch_size):
        chunk = args.images[i:i + batch_size]
        images = [load_image(path) for path in chunk]     # its errors name the file
        probs = model.classify(images, labels, templates, batch_size=batch_size)   # label embeddings are cached
        for path, best in zip(chunk, tasks.ranked(probs, labels, top)):
            if args.json:
                results.append({"image": path, "scores": dict(best)})
            else:
                print(path)
                width = max(len(label) for label, _ in best)
                for label, p in best:
                    print(f"  {100 * p:7.2f}%  {label:<{width}}".rstrip())
                sys.stdout.flush()
    if args.json:
        print_json(results)
    return 0


def _templates_option(value: str):
    if value.lower() in ("imagenet", "none"):
        return None if value.lower() == "none" else "imagenet"
    path = pathlib.Path(value)
    if not path.is_file():
        raise UsageError(f"--templates {value}: not 'imagenet', 'none' or an existing file of templates")
    templates = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        if "{}" not in line:
            raise UsageError(f"{path} line {n}: template {line!r} has no {{}} where the label goes, "
                             "e.g. 'a photo of a {}.'")
        templates.append(line)
    if not templates:
        raise UsageError(f"{path}: no templates in the file (one per line, each containing {{}})")
    return templates



def _check_image_file(path: str) -> None:
    if not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder; classify takes image files (use `tinyclip search` for folders)")
