"""`tinyclip search`: rank the images of a folder or an .npz by similarity to a text or an image.

Arguments are checked before the model loads, so a typo fails at once with one line.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from .. import tasks
from ..errors import UsageError
from ..preprocess import load_image
from ..vectors import unit_rows
from . import add_model_options, check_batch_size, load_model, npz, print_json
from .progress_bar import ProgressBar

DEFAULT_SEARCH_TOP = 10

SEARCH_EPILOG = """\
examples:
  tinyclip search "a dog on a beach" --images photos/           # embeds the folder on the fly
  tinyclip embed photos/ --out photos.npz
  tinyclip search "a dog on a beach" --images photos.npz --top 5
  tinyclip search query.jpg --images photos.npz --json          # an image file as the query

QUERY is an image when it names an existing image file, else a text. Scores
are cosine similarities. An .npz must come from `tinyclip embed` with the same
--model. --json prints [{"path": PATH, "score": COSINE}, ...], best first.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("search", help="rank images by similarity to a text or an image",
                              description="Rank the images of a folder, or of an `embed` .npz, by cosine "
                                          "similarity to QUERY.",
                              epilog=SEARCH_EPILOG, formatter_class=fmt)
    p.add_argument("query", metavar="QUERY", help="a text, or the path of an image file")
    p.add_argument("--images", required=True, metavar="FOLDER_OR_NPZ",
                   help="a folder of images, or an .npz written by `tinyclip embed`")
    p.add_argument("--top", type=int, default=DEFAULT_SEARCH_TOP, metavar="K",
                   help=f"how many results (default: {DEFAULT_SEARCH_TOP})")
    add_model_options(p)
    p.set_defaults(run=run_search)


def run_search(args) -> int:
    top = tasks.check_top(args.top, name="--top")
    batch_size = check_batch_size(args)
    source = args.images
    if os.path.isdir(source):
        stored = None
    elif os.path.isfile(source) and source.lower().endswith(".npz"):
        stored = npz.read_image_embeddings(source, args.model)
    elif os.path.exists(source):
        raise UsageError(f"--images {source}: not a folder or an .npz written by `tinyclip embed`")
    else:
        raise UsageError(f"--images {source}: no such folder or file")
    image_query = os.path.isfile(args.query) and tasks.is_image_file(args.query)
    model = load_model(args)
    if image_query:
        query = model.encode_image([load_image(args.query)], normalize=True, batch_size=1)[0]
    else:
        query = model.encode_text([args.query], normalize=True, batch_size=1)[0]

    if stored is not None:
        embeddings, paths = stored
        if embeddings.shape[1] != model.config.projection_dim:
            raise UsageError(f"--images {source}: embeddings have {embeddings.shape[1]} dimensions, the model "
                             f"{args.model} gives {model.config.projection_dim}; embed again with this --model")
        scores = unit_rows(embeddings) @ query
        order = tasks.top_indices(scores, top)
        best = [(str(paths[i]), float(scores[i])) for i in order]
    else:
        best = _search_folder(model, source, query, top, batch_size)

    if args.json:
        print_json([{"path": p, "score": s} for p, s in best])
    elif not best:
        print(f"no readable images in {source}")
    else:
        print(f"{'rank':>4}  {'score':>7}  path")
        for rank, (p, s) in enumerate(best, 1):
            print(f"{rank:>4}  {s:7.4f}  {p}")
    return 0


def _search_folder(model, folder, query, top, batch_size):
    """Embed the folder a batch at a time, keeping only the `top` best so far."""
    total = sum(1 for _ in tasks.find_images([folder]))
    progress = ProgressBar(total, "images")
    best_paths, best_scores = np.array([], dtype=str), np.array([], np.float32)
    done = skipped = 0

    def skip(path, reason):
        nonlocal skipped
        skipped += 1
        progress.note(f"tinyclip: warning: {path}: skipped ({reason})")

    files = tasks.find_images([folder], on_error=skip)
    for paths, embeds in tasks.embed_image_files(model, files, batch_size=batch_size, normalize=True,
                                                 on_skip=skip):
        best_paths = np.concatenate([best_paths, np.array(paths, dtype=str)])
        best_scores = np.concatenate([best_scores, embeds @ query])
        keep = tasks.top_indices(best_scores, top)
        best_paths, best_scores = best_paths[keep], best_scores[keep]
        done += len(paths)
        progress.update(done + skipped, skipped)
    progress.close()
    return [(str(p), float(s)) for p, s in zip(best_paths, best_scores)]
