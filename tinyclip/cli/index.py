"""`tinyclip index`: a faiss index over the embeddings of an .npz or a Ray output folder (tinyclip.index)."""
from __future__ import annotations

import argparse
import os

from .. import index, progress
from ..errors import UsageError
from . import collection, print_json

INDEX_EPILOG = """\
examples:
  tinyclip embed photos/ --out photos.npz
  tinyclip index photos.npz --out photos.index
  tinyclip search "a dog on a beach" --images photos.index
  tinyclip serve photos.index                                  # a search page in the browser
  tinyclip index photos-emb --out photos.index                 # the folder of `embed --engine ray`

Up to 100,000 images the index is exact (a flat inner-product scan: the
scores `tinyclip search` computes from the .npz). Beyond that it is IVF-Flat:
about sqrt(N) k-means cells, of which a query scans `nprobe`, the fewest that
hold 97% of the 10 nearest neighbours of sample images (measured while
building). --exact or --approximate forces the kind. The index folder holds
index.faiss, index.json (model identity, dtype, kind, parameters) and
paths.npz (absolute paths). Needs faiss: pip install 'tinyclip[search]'.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build a faiss index over embeddings, for fast search",
                              description="Build a faiss index over the image embeddings of an .npz from `tinyclip "
                                          "embed` or a folder from `tinyclip embed --engine ray`.",
                              epilog=INDEX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", metavar="EMBEDDINGS", help="an .npz from `tinyclip embed`, or the output folder "
                   "of `tinyclip embed --engine ray`")
    p.add_argument("--out", required=True, metavar="INDEX", help="the index folder to write (replaced if it is "
                   "an index already)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--exact", dest="exact", action="store_true", default=None,
                      help=f"a flat exact index whatever the size (default up to {index.EXACT_UP_TO:,} images)")
    kind.add_argument("--approximate", dest="exact", action="store_false",
                      help="an IVF-Flat index whatever the size")
    p.add_argument("--json", action="store_true", help="print JSON instead of a sentence")
    p.set_defaults(run=run_index)


def run_index(args) -> int:
    kind = collection.kind_of(args.embeddings, "EMBEDDINGS")
    if kind not in (collection.NPZ, collection.PARQUET):
        raise UsageError(f"EMBEDDINGS {args.embeddings}: an index is built from an .npz written by `tinyclip embed` "
                         "or a folder written by `tinyclip embed --engine ray`; embed the images first")
    if os.path.exists(args.out) and not index.is_index(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a tinyclip index; give a new name")
    index.faiss()      # a missing extra fails before the embeddings are read
    stored = collection.read_embeddings(args.embeddings, kind, "EMBEDDINGS")
    if stored.identity is None:
        raise UsageError(f"EMBEDDINGS {args.embeddings}: written by an older tinyclip (format 1), which recorded no "
                         "fingerprint of the model's weights; embed again")
    if len(stored.embeddings) == 0:
        raise UsageError(f"EMBEDDINGS {args.embeddings}: holds no embeddings")
    try:
        built, info = index.build(stored.embeddings, exact=args.exact, on_status=progress.status)
    finally:
        progress.clear()
    paths = [os.path.abspath(p) for p in stored.paths]
    meta = index.write(args.out, built, info, paths, stored.identity, stored.dtype,
                       os.path.abspath(args.embeddings))
    if args.json:
        print_json({"out": args.out, "count": meta["count"], "dim": meta["dim"], "kind": meta["kind"],
                    "params": meta["params"]})
    else:
        params = meta["params"]
        how = ("exact" if meta["kind"] == "flat" else
               f"ivf-flat: {params['nlist']} cells, a query scans {params['nprobe']} "
               f"(recall@10 {params['calibration_recall']:.3f} on {params['calibration_queries']} sample images)")
        print(f"wrote {args.out}: {meta['count']:,} images x {meta['dim']}, {how}")
    return 0
