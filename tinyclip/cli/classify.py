"""`tinyclip classify`: zero-shot classification of image files over labels.

Arguments are checked before the model loads (which takes seconds), so a typo fails at once
with one line; the work itself lives in tinyclip.tasks.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import warnings

from .. import label_store, tasks
from ..errors import ImageError, UsageError
from ..preprocess import load_image
from . import add_model_options, check_batch_size, images_option, load_model, print_json, rounded
from .lines import read_lines
from .progress_bar import ProgressBar
from .terminal import say, shown

CLASSIFY_EPILOG = """\
examples:
  tinyclip classify cat.jpg dog.png --labels cat dog "hot-air balloon"
  tinyclip classify photos/*.jpg --labels cat dog --top 1 --json
  tinyclip classify cat.jpg --labels cat dog --templates none      # the labels are the prompts
  tinyclip classify cat.jpg --labels cat dog --templates my.txt    # one template per line, "{}" = label

  tinyclip classify photos/*.jpg --labels-file imagenet-classes.txt   # one label per line
  tinyclip classify cat.jpg --labels cat -- -1 --weird-label      # after --, every word is a label

Put --labels after the images: it takes every word that follows, and a word
there that looks like a path (an image file, a / in it, an existing folder) is
refused (a label like that goes after -- or in --labels-file). An image that
cannot be read is skipped with a warning; the exit code is 1 only when none
could be. Probabilities
are softmax(exp(logit_scale) * cosine) over the labels, each label's text
embedding ensembled over the templates (default: OpenAI's 80 ImageNet prompts).
--json prints [{"image": PATH, "scores": {LABEL: PROBABILITY, ...}}, ...], best first,
probabilities to 6 significant digits. Label embeddings are kept on disk per model,
dtype and templates under $TINYCLIP_CACHE_DIR/labels (default ~/.cache/tinyclip/labels),
so the next run with the same labels encodes no text.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="zero-shot classification of images over labels",
                              description="Zero-shot classification: the probability of each label per image.",
                              epilog=CLASSIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    # nargs="*" and checked in run_classify: images swallowed by --labels get a precise one-line error
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    p.add_argument("--labels", nargs="*", metavar="LABEL", default=[], help="the class names (this or --labels-file "
                   "is required)")
    p.add_argument("--labels-file", metavar="FILE", help="a UTF-8 file of class names, one per line (blank lines "
                   "skipped); adds to --labels")
    p.add_argument("--templates", default="imagenet", metavar="imagenet|none|FILE",
                   help="prompt templates: OpenAI's 80 ImageNet prompts (default), none (the labels as "
                        "given), or a file with one template per line containing {}")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show the K best labels per image "
                   "(default: all)")
    images_option.add(p)
    add_model_options(p)
    p.set_defaults(run=run_classify)


def labels_after_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv, extra labels): for `classify ... --labels A B -- -C --D`, the words after "--" are labels,
    which lets a label start with "-". argparse alone would take them for images."""
    if not argv or argv[0] != "classify" or "--" not in argv:
        return argv, []
    end = argv.index("--")
    if "--labels" not in argv[:end]:
        return argv, []
    return argv[:end], argv[end + 1:]


def run_classify(args) -> int:
    labels = _labels(args)
    if not args.images:
        raise UsageError("no images: give image files before --labels (it takes every word that follows)")
    labels = tasks.check_labels(labels)
    top = tasks.check_top(args.top, allow_none=True, name="--top")
    templates = _templates_option(args.templates)
    batch_size = check_batch_size(args)
    for path in args.images:
        _check_image_file(path)
    images_option.apply(args)
    model = load_model(args)
    if len(labels) == 1:     # after the errors that come before loading, which would end the run anyway
        warnings.warn(f"one label ({labels[0]!r}): probabilities are over the labels given, so every image "
                      "gets 100%; give two or more labels to compare")
    _embed_labels(model, labels, templates, batch_size)

    results, skipped = [], 0
    for i in range(0, len(args.images), batch_size):
        chunk, images = [], []
        for path in args.images[i:i + batch_size]:
            try:
                images.append(load_image(path))
            except ImageError as e:     # one bad file must not end the run: skip it, as embed and search do
                skipped += 1
                warnings.warn(f"{e}; skipped")
                continue
            chunk.append(path)
        if not images:
            continue
        probs = model.classify(images, labels, templates, batch_size=batch_size)   # label embeddings are cached
        for path, best in zip(chunk, tasks.ranked(probs, labels, top)):
            if args.json:
                results.append({"image": path, "scores": {label: rounded(p) for label, p in best}})
            else:
                say(shown(path))
                width = max(len(shown(label)) for label, _ in best)
                for label, p in best:
                    say(f"  {100 * p:7.2f}%  {shown(label):<{width}}".rstrip())
                sys.stdout.flush()
    if skipped == len(args.images):
        raise ImageError(f"none of the {skipped} images could be read (see the warnings); nothing classified")
    if args.json:
        print_json(results)
    return 0


def _labels(args) -> list[str]:
    """--labels then the lines of --labels-file; an image file among them is an error, since it is
    almost surely an image that --labels swallowed."""
    labels = list(args.labels)
    if args.labels_file:
        if not os.path.isfile(args.labels_file):
            raise UsageError(f"--labels-file {args.labels_file}: no such file")
        labels += [line.strip() for line in read_lines(args.labels_file) if line.strip()]
        if not labels:
            raise UsageError(f"--labels-file {args.labels_file}: the file has no non-blank lines")
    if not labels:
        raise UsageError("no labels: give the class names with --labels L1 L2 ... (after the images) "
                         "or --labels-file FILE")
    typed = args.labels[:len(args.labels) - len(getattr(args, "dashed_labels", []))]    # not those after --
    for label in typed:
        if tasks.is_image_file(label) and os.path.isfile(label):
            raise UsageError(f"--labels took {label}, an image file: put the images before --labels, "
                             "which takes every word that follows")
        if why := tasks.looks_like_a_path(label):
            raise UsageError(f"--labels took {label}, which {why}: put the images before --labels, which takes "
                             "every word that follows (a label with a / goes in --labels-file, or after --)")
    return labels


def _embed_labels(model, labels: list[str], templates, batch_size: int) -> None:
    """Fill the model's label cache, from the disk store where it has them; a progress bar
    (on a terminal) while the prompts of new labels are encoded."""
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = ProgressBar(total, "label prompts")
        bar.update(done)

    tasks.label_embeddings(model, labels, templates, batch_size=batch_size, store=label_store.default(),
                           on_progress=progress)
    if bar is not None:
        bar.close()


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
