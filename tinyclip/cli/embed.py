"""`tinyclip embed`: image or text embeddings into an .npz file, a batch at a time.

Arguments are checked before the model loads, so a typo fails at once with one line.
"""
from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np

from .. import tasks
from ..errors import ImageError, UsageError
from . import add_model_options, check_batch_size, embed_ray, load_model, npz, print_json
from .lines import read_lines
from .progress_bar import ProgressBar
from .terminal import say, shown

EMBED_EPILOG = """\
examples:
  tinyclip embed photos/ --out photos.npz                 # every image under photos/, recursively
  tinyclip embed a.jpg b.png more/ --out some.npz --normalize
  tinyclip embed --texts captions.txt --out captions.npz  # one text per line (blank lines skipped)
  tinyclip embed photos/ --out photos-emb --engine ray    # Ray workers: a resumable folder of Parquet shards

The .npz holds `embeddings` (N x D float32), `paths` (relative to `root`, the
folder embed ran in) or `texts`, `model_identity` (hub id, revision, folder and a
fingerprint of the weights, so a copied checkpoint still matches), `dtype`,
`normalized`, `projection_dim` and `format`. Folders are searched recursively for
.jpg .jpeg .png .webp .bmp .gif .tif .tiff files (hidden files and folders left
out); files that cannot be read are skipped with a warning and counted. Images
are read and embedded --batch-size at a time, so memory stays bounded.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("embed", help="write image or text embeddings to an .npz",
                              description="Embed images (files, folders) or texts into an .npz file.",
                              epilog=EMBED_EPILOG, formatter_class=fmt)
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="the .npz to write")
    p.add_argument("--texts", metavar="FILE", help="embed the lines of this text file instead of images")
    p.add_argument("--normalize", action="store_true", help="store unit-length embeddings")
    embed_ray.add_options(p)
    add_model_options(p)
    p.set_defaults(run=run_embed)


def run_embed(args) -> int:
    if args.engine == "ray":
        return embed_ray.run_embed(args)
    embed_ray.check_local(args)
    out = pathlib.Path(args.out)
    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {args.out}: the file name must end in .npz")
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {out.parent} does not exist")
    if args.texts and args.paths:
        raise UsageError("give image PATHs or --texts FILE, not both")
    if not args.texts and not args.paths:
        raise UsageError("nothing to embed: give image files or folders, or --texts FILE")
    batch_size = check_batch_size(args)
    if args.texts:
        if not os.path.isfile(args.texts):
            raise UsageError(f"--texts {args.texts}: no such file")
        total = sum(1 for line in read_lines(args.texts) if line.strip())
        if total == 0:
            raise UsageError(f"--texts {args.texts}: the file has no non-blank lines")
    else:
        for p in args.paths:
            if not os.path.exists(p):
                raise ImageError(f"{p}: no such file or folder")
        total = sum(1 for _ in tasks.find_images(args.paths))
        if total == 0:
            raise UsageError(f"no image files ({' '.join(sorted(tasks.IMAGE_EXTENSIONS))}) in "
                             f"{' '.join(args.paths)}")
    model = load_model(args)
    dim = model.config.projection_dim
    rows = Rows(total, dim)
    names: list[str] = []
    skipped: list[dict] = []
    progress = ProgressBar(total, "texts" if args.texts else "images")

    def skip(path, reason):
        skipped.append({"path": path, "reason": reason})
        progress.note(f"tinyclip: warning: {path}: skipped ({reason})")

    if args.texts:
        batches = _text_batches(model, args.texts, batch_size, args.normalize)
    else:
        files = tasks.find_images(args.paths, on_error=skip)
        batches = tasks.embed_image_files(model, files, batch_size=batch_size, normalize=args.normalize,
                                          on_skip=skip)
    for batch_names, embeds in batches:
        rows.append(embeds)
        names.extend(batch_names)
        progress.update(len(names) + len(skipped), len(skipped))
    progress.close()
    if not names:
        raise ImageError(f"none of the {len(skipped)} files could be read; nothing written to {out}")

    described = npz.header(model.identity, model.dtype, args.normalize, dim)
    if args.texts:
        npz.save(out, embeddings=rows.array(), texts=np.array(names, dtype=str), **described)
    else:
        root = os.getcwd()     # paths stay as typed, and resolve from elsewhere through the root
        npz.save(out, embeddings=rows.array(), paths=np.array([npz.stored_path(n, root) for n in names], dtype=str),
                 root=np.array(root), **described)
    if args.json:
        print_json({"out": str(out), "count": len(names), "dim": dim, "skipped": skipped})
    else:
        what = "texts" if args.texts else "images"
        note = f"; skipped {len(skipped)} unreadable file{'s' * (len(skipped) != 1)}" if skipped else ""
        say(f"wrote {len(names)} {what} x {dim} float32 embeddings to {shown(out)}{note}")
    return 0


def _text_batches(model, path, batch_size: int, normalize: bool):
    batch = []
    for line in read_lines(path):
        if line.strip():
            batch.append(line)
        if len(batch) == batch_size:
            yield batch, model.encode_text(batch, normalize=normalize, batch_size=batch_size)
            batch = []
    if batch:
        yield batch, model.encode_text(batch, normalize=normalize, batch_size=batch_size)


class Rows:
    """A (N, D) float32 array filled a batch at a time: preallocated to the expected count,
    doubled if more rows come (files added during the run)."""

    def __init__(self, capacity: int, dim: int):
        self.data = np.empty((max(capacity, 1), dim), np.float32)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        if self.n + len(rows) > len(self.data):
            grown = np.empty((max(2 * len(self.data), self.n + len(rows)), self.data.shape[1]), np.float32)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n:self.n + len(rows)] = rows
        self.n += len(rows)

    def array(self) -> np.ndarray:
        return self.data[:self.n]
