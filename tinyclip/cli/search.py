"""`tinyclip search`: rank the images of a folder or an .npz by similarity to a text or an image.

Arguments are checked before the model loads, so a typo fails at once with one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from .. import index, tasks
from ..hub import DEFAULT_MODEL
from ..errors import ImageError, TruncationWarning, UsageError
from ..preprocess import load_image
from ..vectors import unit_rows
from . import (add_model_options, check_batch_size, check_device, collection, images_option, load_model, npz,
               print_json, rounded)
from .progress_bar import ProgressBar
from .terminal import say, shown

DEFAULT_SEARCH_TOP = 10

SEARCH_EPILOG = """\
examples:
  tinyclip search "a dog on a beach" --images photos/           # embeds the folder on the fly
  tinyclip embed photos/ --out photos.npz
  tinyclip search "a dog on a beach" --images photos.npz --top 5
  tinyclip search query.jpg --images photos.npz --json          # an image file as the query
  tinyclip index photos.npz --out photos.index                  # a faiss index, for large collections
  tinyclip search "a dog on a beach" --images photos.index

QUERY is an image when it ends in an image suffix (.jpg, .png, ...), which must
then exist, or names an existing file; a QUERY that looks like a path (a / in
it, an existing folder) is refused; otherwise, or with --text, it is a text.
Without --model, an .npz or an index is searched with the model it records (its
folder, or its hub id), which is said on stderr. Scores are cosine
similarities. An .npz must come from `tinyclip embed` with the same weights
(compared by fingerprint, so a copied checkpoint or another cache is fine) and
dtype, unless --allow-other-model; so must an index. Its paths are shown as they resolve from
here. --json prints [{"path": PATH, "score": COSINE}, ...], best first, cosines
to 6 significant digits.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("search", help="rank images by similarity to a text or an image",
                              description="Rank the images of a folder, or of an `embed` .npz, by cosine "
                                          "similarity to QUERY.",
                              epilog=SEARCH_EPILOG, formatter_class=fmt)
    p.add_argument("query", metavar="QUERY", help="a text, or the path of an image file")
    p.add_argument("--images", required=True, metavar="FOLDER_NPZ_OR_INDEX",
                   help="a folder of images, an .npz written by `tinyclip embed`, a folder written by "
                        "`tinyclip embed --engine ray`, or an index written by `tinyclip index`")
    p.add_argument("--top", type=int, default=DEFAULT_SEARCH_TOP, metavar="K",
                   help=f"how many results (default: {DEFAULT_SEARCH_TOP})")
    p.add_argument("--text", action="store_true", help="QUERY is a text even if it looks like an image path")
    p.add_argument("--allow-other-model", action="store_true",
                   help="search an .npz embedded with other weights or another dtype, with a warning")
    images_option.add(p)
    add_model_options(p)
    p.set_defaults(model=None)     # None: the model an .npz records, else the default (run_search)
    p.set_defaults(run=run_search)


def run_search(args) -> int:
    if not args.query.strip():
        raise UsageError("QUERY is empty: give a text to search for, or an image file")
    top = tasks.check_top(args.top, name="--top")
    batch_size = check_batch_size(args)
    image_query = not args.text and (tasks.is_image_file(args.query) or os.path.isfile(args.query))
    if image_query and not os.path.isfile(args.query):
        raise ImageError(f"{args.query}: no such image file (QUERY ending in {os.path.splitext(args.query)[1]} "
                         "names an image); to search for these words as text, add --text")
    if not image_query and not args.text and (why := tasks.looks_like_a_path(args.query)):
        raise ImageError(f"QUERY {args.query} {why}, so it looks like an image path, not a text; to search "
                         "for these words as text, add --text")
    source = args.images
    kind = collection.kind_of(source, "--images")
    stored = found = meta = None
    if kind == collection.INDEX:      # built by `tinyclip index`: faiss answers from the index
        meta = index.read_meta(source)
    elif kind != collection.IMAGES:
        stored = collection.read_embeddings(source, kind, "--images")
    if args.model is None:
        if meta is not None:
            args.model = _recorded_model(meta["model"], None, source, args)
        else:
            args.model = _recorded_model(stored.identity, stored.old_model, source, args) if stored else DEFAULT_MODEL
    backend = check_device(args)
    dtype = backend.check_dtype(args.dtype)
    if meta is not None:
        collection.check_same_model(meta["model"], meta["dtype"], args, f"--images {source}", dtype)
        found = index.read(source, meta)
    elif stored is not None:
        collection.check_same_model(stored.identity, stored.dtype, args, f"--images {source}", dtype,
                                    stored.old_model)
    images_option.apply(args)
    model = load_model(args)
    if image_query:
        query = model.encode_image([load_image(args.query)], normalize=True, batch_size=1)[0]
    else:
        if tasks.is_cut(model, args.query):
            context = model.config.text_config.max_position_embeddings
            warnings.warn(f"QUERY is cut to fit the model's {context}-token context (more than {context - 2} tokens "
                          "besides start and end): only its start counts", TruncationWarning)
        query = model.encode_text([args.query], normalize=True, batch_size=1)[0]

    dim = found.dim if found is not None else stored.embeddings.shape[1] if stored is not None else None
    if dim is not None and dim != model.config.projection_dim:
        raise UsageError(f"--images {source}: embeddings have {dim} dimensions, the model {args.model} gives "
                         f"{model.config.projection_dim}; embed again with this --model")
    if found is not None or stored is not None:
        if found is not None:
            scores, ids = found.search(query, top)
            best = [(npz.stored_path(found.paths[i], os.getcwd()), float(s)) for i, s in zip(ids[0], scores[0])
                    if i >= 0]
        else:
            scores = unit_rows(stored.embeddings) @ query
            best = [(stored.paths[i], float(scores[i])) for i in tasks.top_indices(scores, top)]
        if gone := npz.missing([p for p, _ in best]):
            warnings.warn(f"--images {source}: {len(gone)} of the {len(best)} results {'are' if len(gone) > 1 else 'is'} "
                          f"no longer where the embeddings say (e.g. {gone[0]}): moved or deleted since they were "
                          "embedded; embed the files again where they are now")
    else:
        best = _search_folder(model, source, query, top, batch_size)
        if not best:
            raise ImageError(f"--images {source}: none of its image files could be read (see the warnings)")

    if args.json:
        print_json([{"path": p, "score": rounded(s)} for p, s in best])
    else:
        say(f"{'rank':>4}  {'score':>7}  path")
        for rank, (p, s) in enumerate(best, 1):
            say(f"{rank:>4}  {s:7.4f}  {shown(p)}")
    return 0


def _recorded_model(identity: dict | None, old_model: str | None, source: str, args) -> str:
    """The model the embeddings (of an .npz, a Ray folder or an index) were made with, for a search without
    --model: its folder where it still holds the checkpoint, else its hub id (from the Hugging Face cache or
    the hub); said on stderr."""
    from .. import hub
    from ..errors import CheckpointNotFoundError
    if identity is None:    # format 1 recorded only a name
        candidates = [(old_model, None)] if old_model else []
    else:
        candidates = [(identity.get("folder"), None), (identity.get("hub_id"), identity.get("revision"))]
    tried = []
    for name, revision in candidates:
        if not name:
            continue
        revision = args.revision or revision
        try:
            with warnings.catch_warnings():     # a folder with --revision: said when the model loads
                warnings.simplefilter("ignore")
                hub.locate(name, revision=revision, cache_dir=args.cache_dir)
        except CheckpointNotFoundError as e:
            tried.append(str(e).split(". ")[0])
            continue
        say(f"tinyclip: using {name}{'@' + revision if revision else ''}, the model {source} was embedded with "
            "(--model to choose another)", file=sys.stderr, flush=True)
        args.revision = revision
        return name
    raise UsageError(f"--images {source}: the model it was embedded with is not here ({'; '.join(tried) or 'none recorded'}); "
                     "pass --model")


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
