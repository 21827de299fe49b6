"""`tinyclip embed`: image or text embeddings into an .npz file, a batch at a time.

Arguments are checked before the model loads, so a typo fails at once with one line.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import warnings

import numpy as np

from .. import tasks
from ..errors import ImageError, TruncationWarning, UsageError
from . import add_model_options, check_batch_size, images_option, embed_ray, load_model, npz, print_json
from .lines import read_lines
from .progress_bar import ProgressBar
from .terminal import say, shown

EMBED_EPILOG = """\
examples:
  tinyclip embed photos/ --out photos.npz                 # every image under photos/, recursively
  tinyclip embed a.jpg b.png more/ --out some.npz --normalize
  tinyclip embed --texts captions.txt --out captions.npz  # one text per line (blank lines skipped)
  tinyclip embed photos/ --out photos-emb --engine ray    # Ray workers: a resumable folder of Parquet shards

The .npz holds `embeddings` (N x D float32), `paths` (relative to the .npz's
folder) or `texts`, `model_identity` (hub id, revision, folder and a
fingerprint of the weights, so a copied checkpoint still matches), `dtype`,
`normalized`, `projection_dim` and `format`. Folders are searched recursively for
.jpg .jpeg .png .webp .bmp .gif .tif .tiff files (hidden files and folders left
out); a file named twice (or reached through two arguments) is embedded once.
Files that cannot be read are skipped with a warning and counted. Images are
read and embedded --batch-size at a time, so memory stays bounded. Image paths
are stored relative to the .npz's folder where they lie under it, so a folder
moved together with its .npz still resolves. An existing --out is replaced only
with --overwrite; --out is checked before the model loads.
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
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")
    images_option.add(p)
    embed_ray.add_options(p)
    add_model_options(p)
    p.set_defaults(run=run_embed)


def run_embed(args) -> int:
    if args.engine == "ray":
        return embed_ray.run_embed(args)
    embed_ray.check_local(args)
    out = pathlib.Path(args.out)
    npz.check_out(out, args.overwrite)     # before the model loads, not after all the work
    if args.texts and args.paths:
        raise UsageError("give image PATHs or --texts FILE, not both")
    if not args.texts and not args.paths:
        raise UsageError("nothing to embed: give image files or folders, or --texts FILE")
    batch_size = check_batch_size(args)
    if args.texts:
        if not os.path.isfile(args.texts):
            raise UsageError(f"--texts {args.texts}: no such file")
        total = sum(1 for line in read_lines(args.texts) if line.strip())
        # the cut texts are found after the model loads (its tokenizer), warned about as one line at the end
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
    images_option.apply(args)
    model = load_model(args)
    dim = model.config.projection_dim
    rows = Rows(total, dim)
    names: list[str] = []
    skipped: list[dict] = []
    progress = ProgressBar(total, "texts" if args.texts else "images")

    def skip(path, reason):
        skipped.append({"path": path, "reason": reason})
        progress.note(f"tinyclip: warning: {path}: skipped ({reason})")

    cut: list[int] = []     # line numbers of texts longer than the context
    if args.texts:
        batches = _text_batches(model, args.texts, batch_size, args.normalize, cut)
    else:
        files = tasks.find_images(args.paths, on_error=skip)
        batches = tasks.embed_image_files(model, files, batch_size=batch_size, normalize=args.normalize,
                                          on_skip=skip)
    for batch_names, embeds in batches:
        rows.append(embeds)
        names.extend(batch_names)
        progress.update(len(names) + len(skipped), len(skipped))
    progress.close()
    if cut:
        context = model.config.text_config.max_position_embeddings
        numbers = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        warnings.warn(f"{shown(args.texts)}: {len(cut)} of the {len(names)} texts (line{'s' * (len(cut) > 1)} {numbers}) "
                      f"{'are' if len(cut) > 1 else 'is'} cut to fit the model's {context}-token context: only "
                      f"{'their' if len(cut) > 1 else 'its'} start counts", TruncationWarning)
    if not names:
        raise ImageError(f"none of the {len(skipped)} files could be read; nothing written to {out}")

    described = npz.header(model.identity, model.dtype, args.normalize, dim)
    if args.texts:
        npz.save(out, embeddings=rows.array(), texts=np.array(names, dtype=str), **described)
    else:
        root = os.path.dirname(os.path.abspath(out))    # paths move with the .npz's folder (npz.py, format 3)
        npz.save(out, embeddings=rows.array(), paths=np.array([npz.stored_path(n, root) for n in names], dtype=str),
                 root=np.array(root), **described)
    if args.json:
        print_json({"out": str(out), "count": len(names), "dim": dim, "skipped": skipped})
    else:
        what = "texts" if args.texts else "images"
        note = f"; skipped {len(skipped)} unreadable file{'s' * (len(skipped) != 1)}" if skipped else ""
        say(f"wrote {len(names)} {what} x {dim} float32 embeddings to {shown(out)}{note}")
    return 0


def _text_batches(model, path, batch_size: int, normalize: bool, cut: list[int]):
    """(texts, embeddings) a batch at a time; the line numbers of texts the context cuts go to `cut`."""
    batch = []
    for n, line in enumerate(read_lines(path), 1):
        if line.strip():
            batch.append(line)
            if tasks.is_cut(model, line):
                cut.append(n)
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
