"""The `classify`, `embed` and `search` subcommands of `tinyclip`.

Arguments are checked before the model loads (which takes seconds), so a typo
fails at once with one line; the work itself lives in tinyclip.tasks.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

from .errors import ImageError
from .preprocess import load_image
from . import ray_cli, shards, tasks
from .tasks import UsageError

DEFAULT_SEARCH_TOP = 10
NPZ_FORMAT = 1    # stored as `format` in embed's .npz, for readers to check

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

EMBED_EPILOG = """\
examples:
  tinyclip embed photos/ --out photos.npz                 # every image under photos/, recursively
  tinyclip embed a.jpg b.png more/ --out some.npz --normalize
  tinyclip embed --texts captions.txt --out captions.npz  # one text per line (blank lines skipped)
  tinyclip embed photos/ --out photos-emb --engine ray    # Ray workers: a resumable folder of Parquet shards

The .npz holds `embeddings` (N x D float32), `paths` (or `texts`), and `model`,
`projection_dim`, `normalized`, `format`. Folders are searched recursively for
.jpg .jpeg .png .webp .bmp .gif .tif .tiff files (hidden files and folders left
out); files that cannot be read are skipped with a warning and counted. Images
are read and embedded --batch-size at a time, so memory stays bounded.
"""

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
    from .cli import add_model_options
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

    p = subparsers.add_parser("embed", help="write image or text embeddings to an .npz",
                              description="Embed images (files, folders) or texts into an .npz file.",
                              epilog=EMBED_EPILOG, formatter_class=fmt)
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files and folders")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="the .npz to write")
    p.add_argument("--texts", metavar="FILE", help="embed the lines of this text file instead of images")
    p.add_argument("--normalize", action="store_true", help="store unit-length embeddings")
    ray_cli.add_options(p)
    add_model_options(p)
    p.set_defaults(run=run_embed)

    p = subparsers.add_parser("search", help="rank images by similarity to a text or an image",
                              description="Rank the images of a folder, or of an `embed` .npz, by cosine "
                                          "similarity to QUERY.",
                              epilog=SEARCH_EPILOG, formatter_class=fmt)
    p.add_argument("query", metavar="QUERY", help="a text, or the path of an image file")
    p.add_argument("--images", required=True, metavar="FOLDER_OR_NPZ",
                   help="a folder of images, an .npz written by `tinyclip embed`, or a folder written by "
                        "`tinyclip embed --engine ray`")
    p.add_argument("--top", type=int, default=DEFAULT_SEARCH_TOP, metavar="K",
                   help=f"how many results (default: {DEFAULT_SEARCH_TOP})")
    add_model_options(p)
    p.set_defaults(run=run_search)


# ---- classify ----------------------------------------------------------------------------------------

def run_classify(args) -> int:
    if not args.labels:
        raise UsageError("no labels: give the class names with --labels L1 L2 ... (after the images)")
    labels = tasks.check_labels(args.labels)
    top = tasks.check_top(args.top, allow_none=True, name="--top")
    templates = _templates_option(args.templates)
    batch_size = _batch_size(args)
    for path in args.images:
        _check_image_file(path)
    model = _load(args)

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
        _print_json(results)
    return 0


def _templates_option(value: str):
    if value.lower() in ("imagenet", "none"):
        return None if value.lower() == "none" else "imagenet"
    path = pathlib.Path(value)
    if not path.is_file():
        raise UsageError(f"--templates {value}: not 'imagenet', 'none' or an existing file of templates")
    templates = []
    for n, line in enumerate(_read_lines(path), 1):
        if not line.strip():
            continue
        if "{}" not in line:
            raise UsageError(f"{path} line {n}: template {line!r} has no {{}} where the label goes, "
                             "e.g. 'a photo of a {}.'")
        templates.append(line)
    if not templates:
        raise UsageError(f"{path}: no templates in the file (one per line, each containing {{}})")
    return templates


# ---- embed -------------------------------------------------------------------------------------------

def run_embed(args) -> int:
    if args.engine == "ray":
        return ray_cli.run_embed(args)
    ray_cli.check_local(args)
    out = pathlib.Path(args.out)
    if out.suffix.lower() != ".npz":
        raise UsageError(f"--out {args.out}: the file name must end in .npz")
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {out.parent} does not exist")
    if args.texts and args.paths:
        raise UsageError("give image PATHs or --texts FILE, not both")
    if not args.texts and not args.paths:
        raise UsageError("nothing to embed: give image files or folders, or --texts FILE")
    batch_size = _batch_size(args)
    if args.texts:
        if not os.path.isfile(args.texts):
            raise UsageError(f"--texts {args.texts}: no such file")
        total = sum(1 for line in _read_lines(args.texts) if line.strip())
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
    model = _load(args)
    dim = model.config.projection_dim
    rows = _Rows(total, dim)
    names: list[str] = []
    skipped: list[dict] = []
    progress = _Progress(total, "texts" if args.texts else "images")

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

    kind = "texts" if args.texts else "paths"
    _save_npz(out, embeddings=rows.array(), **{kind: np.array(names, dtype=str)},
              model=np.array(model_identity(args.model)), projection_dim=np.array(dim, np.int64),
              normalized=np.array(bool(args.normalize)), format=np.array(NPZ_FORMAT, np.int64))
    if args.json:
        _print_json({"out": str(out), "count": len(names), "dim": dim, "skipped": skipped})
    else:
        what = "texts" if args.texts else "images"
        note = f"; skipped {len(skipped)} unreadable file{'s' * (len(skipped) != 1)}" if skipped else ""
        print(f"wrote {len(names)} {what} x {dim} float32 embeddings to {out}{note}")
    return 0


def _text_batches(model, path, batch_size: int, normalize: bool):
    batch = []
    for line in _read_lines(path):
        if line.strip():
            batch.append(line)
        if len(batch) == batch_size:
            yield batch, model.encode_text(batch, normalize=normalize, batch_size=batch_size)
            batch = []
    if batch:
        yield batch, model.encode_text(batch, normalize=normalize, batch_size=batch_size)


class _Rows:
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


def _save_npz(out: pathlib.Path, **arrays) -> None:
    # written next to the target and renamed, so an interrupted run never leaves a truncated .npz
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the file ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


# ---- search ------------------------------------------------------------------------------------------

def run_search(args) -> int:
    top = tasks.check_top(args.top, name="--top")
    batch_size = _batch_size(args)
    source = args.images
    if os.path.isdir(source) and shards.is_output_folder(source):
        npz = shards.read_for_search(source, args.model)
    elif os.path.isdir(source):
        npz = None
    elif os.path.isfile(source) and source.lower().endswith(".npz"):
        npz = _read_embeddings(source, args.model)
    elif os.path.exists(source):
        raise UsageError(f"--images {source}: not a folder or an .npz written by `tinyclip embed`")
    else:
        raise UsageError(f"--images {source}: no such folder or file")
    image_query = os.path.isfile(args.query) and tasks.is_image_file(args.query)
    model = _load(args)
    if image_query:
        query = model.encode_image([load_image(args.query)], normalize=True, batch_size=1)[0]
    else:
        query = model.encode_text([args.query], normalize=True, batch_size=1)[0]

    if npz is not None:
        embeddings, paths = npz
        if embeddings.shape[1] != model.config.projection_dim:
            raise UsageError(f"--images {source}: embeddings have {embeddings.shape[1]} dimensions, the model "
                             f"{args.model} gives {model.config.projection_dim}; embed again with this --model")
        scores = _unit(embeddings) @ query
        order = tasks.top_indices(scores, top)
        best = [(str(paths[i]), float(scores[i])) for i in order]
    else:
        best = _search_folder(model, source, query, top, batch_size)

    if args.json:
        _print_json([{"path": p, "score": s} for p, s in best])
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
    progress = _Progress(total, "images")
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


def _read_embeddings(path: str, model_name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:
        raise UsageError(f"--images {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "texts" in arrays and "paths" not in arrays:
        raise UsageError(f"--images {path}: holds text embeddings (made with --texts), not images")
    missing = [k for k in ("embeddings", "paths", "model") if k not in arrays]
    if missing:
        raise UsageError(f"--images {path}: not written by `tinyclip embed` (no {', '.join(missing)} array)")
    embeddings, paths = arrays["embeddings"], arrays["paths"]
    if embeddings.ndim != 2 or paths.shape != (len(embeddings),):
        raise UsageError(f"--images {path}: embeddings {embeddings.shape} and paths {paths.shape} do not match")
    stored, current = str(arrays["model"]), model_identity(model_name)
    if stored != current:
        raise UsageError(f"--images {path}: embedded with model {stored}, not {current}; search with "
                         f"--model {stored}, or embed again with this model")
    return embeddings.astype(np.float32, copy=False), paths


# ---- shared ------------------------------------------------------------------------------------------

def model_identity(name) -> str:
    """What an .npz records as its model: a local folder's absolute path, else the hub id as given."""
    path = pathlib.Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def _load(args):
    from .api import load
    return load(args.model, device=args.device, dtype=args.dtype)


def _batch_size(args) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    return args.batch_size


def _check_image_file(path: str) -> None:
    if not os.path.exists(path):
        raise ImageError(f"{path}: image file not found")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder; classify takes image files (use `tinyclip search` for folders)")


def _read_lines(path):
    """The lines of a UTF-8 text file, without their line endings, read lazily."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1, norm)


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


class _Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    WIDTH = 30

    def __init__(self, total: int, what: str, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total, self.what = total, what
        self.done = self.skipped = 0
        self.start = self.last_draw = time.monotonic()
        self.drawn = False
        if self.enabled:
            self._draw()

    def update(self, done: int, skipped: int = 0) -> None:
        self.done, self.skipped = done, skipped
        now = time.monotonic()
        if self.enabled and (now - self.last_draw >= 0.1 or done >= self.total):
            self.last_draw = now
            self._draw()

    def note(self, message: str) -> None:
        """Print a line (a warning) above the bar."""
        if self.drawn:
            self.stream.write("\r\033[K")
        print(message, file=self.stream)
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if self.drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def _draw(self) -> None:
        total = max(self.total, self.done, 1)
        filled = int(self.WIDTH * self.done / total)
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", {_duration((total - self.done) / rate)} left" if rate > 0 and self.done < total else ""
        skipped = f", {self.skipped} skipped" if self.skipped else ""
        self.stream.write(f"\r\033[K{self.what} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{self.done}/{total} ({rate:.1f}/s{eta}{skipped})")
        self.stream.flush()
        self.drawn = True


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
