"""`tinyclip embed SRC --out DIR --engine ray`: the command-line side of tinyclip.ray.

The options are registered on `embed`'s parser by `add_options`; `run_embed` checks them and runs
`tinyclip.ray.embed_to_folder`. Ray itself is imported only when the ray engine runs, so `tinyclip
--help` and the default engine work without it.
"""
from __future__ import annotations

import itertools
import os

from ..errors import UsageError
from .terminal import json_text, say, shown

ENGINES = ("local", "ray")


def add_options(p) -> None:
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process, into an .npz (default); ray: Ray Data workers, into a resumable "
                        "folder of Parquet shards (pip install 'tinyclip[ray]')")
    p.add_argument("--address", default=None, metavar="auto|ray://HOST:PORT",
                   help="with --engine ray: the Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --engine ray: encoding actors, each loading the model (default: 1)")


def check_local(args) -> None:
    """The ray-only options are refused with the default engine rather than ignored."""
    for name in ("address", "workers"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name} works with --engine ray only")


def run_embed(args) -> int:
    """Embed the images SRC names (folders, lists of paths, .parquet/.csv tables with a path column)
    into the folder --out with Ray; prints a summary (JSON with --json)."""
    if args.texts:
        raise UsageError("--engine ray embeds images; embed --texts without --engine ray")
    if args.image_size is not None:
        raise UsageError("--image-size is not passed to Ray workers; drop it, or embed without --engine ray")
    if args.tf32:
        raise UsageError("--tf32 is not passed to Ray workers (their embeddings are exact float32); "
                         "drop --tf32, or embed without --engine ray")
    if not args.paths:
        raise UsageError("nothing to embed: give a folder, a text file of paths, or a .parquet/.csv with a "
                         "path column")
    if args.out.lower().endswith(".npz"):
        raise UsageError(f"--out {args.out}: --engine ray writes a folder of Parquet shards, not an .npz; "
                         "give a folder name")
    workers = 1 if args.workers is None else args.workers
    if workers < 1:
        raise UsageError(f"--workers must be a positive integer, got {workers}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    from .. import sources
    paths = itertools.chain.from_iterable(sources.image_paths(src) for src in args.paths)
    from .. import ray as tinyclip_ray      # MissingDependencyError (one line) without Ray
    tinyclip_ray.quiet_logs()
    manifest = tinyclip_ray.embed_to_folder(paths, args.out, args.model, device=args.device, dtype=args.dtype,
                                            batch_size=args.batch_size, workers=workers,
                                            normalize=args.normalize, address=args.address)
    summary = {"out": os.path.abspath(args.out), "count": manifest["count"], "errors": manifest["errors"],
               "dim": manifest["projection_dim"]}
    if args.json:
        say(json_text(summary))
    else:
        note = f"; {summary['errors']} unreadable (see the error column)" if summary["errors"] else ""
        say(f"{shown(summary['out'])}: {summary['count']} images x {summary['dim']} float32 embeddings{note}")
    return 0
