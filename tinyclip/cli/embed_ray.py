"""`tinyclip embed SRC --out DIR --engine ray`: the command-line side of tinyclip.ray.

The options are registered on `embed`'s parser by `add_options`; `run_embed` checks them and runs
`tinyclip.ray.embed_to_folder`. Ray itself is imported only when the ray engine runs, so `tinyclip
--help` and the default engine work without it.

While Ray runs, everything written to this process's stderr file descriptor (Ray's own log lines,
from its C++ core as from Python, and what its workers print) goes to a log file,
$TINYCLIP_CACHE_DIR/ray-logs/<time>-<pid>.log; the terminal gets only tinyclip's progress bar,
warnings and errors, and an error names the log file.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import sys
import time
import traceback
import warnings

from ..errors import TinyClipError, UsageError
from .terminal import json_text, say, shown

KEEP_LOGS = 20        # Ray log files kept in the cache folder, newest first

ENGINES = ("local", "ray")


def add_options(p) -> None:
    p.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process, into an .npz (default); ray: Ray Data workers, into a resumable "
                        "folder of Parquet shards (pip install 'tinyclip[ray]')")
    p.add_argument("--address", default=None, metavar="auto|ray://HOST:PORT",
                   help="with --engine ray: the Ray cluster to run on (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --engine ray: encoding actors, each loading the model (default: 1)")
    p.add_argument("--no-retry", action="store_const", const=True, default=None,
                   help="with --engine ray: do not try again the files that could not be read in an earlier "
                        "run into the same --out (default: they are tried again)")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="with --engine ray: how long to wait for CPUs/GPUs that other Ray jobs hold "
                        "(default: 120; 0 fails at once)")


def check_local(args) -> None:
    """The ray-only options are refused with the default engine rather than ignored."""
    for name in ("address", "workers", "no_retry", "wait"):
        if getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} works with --engine ray only")


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
    wait_s = 120.0 if args.wait is None else args.wait
    if not wait_s >= 0:
        raise UsageError(f"--wait must be 0 or more seconds, got {args.wait}")
    from .. import progress, sources
    paths = itertools.chain.from_iterable(sources.image_paths(src) for src in args.paths)
    from .. import ray as tinyclip_ray      # MissingDependencyError (one line) without Ray
    tinyclip_ray.quiet_logs()
    with ray_output_to_log(lambda: tinyclip_ray.connects) as terminal:
        bar = None

        def on_progress(done, total):
            nonlocal bar
            if bar is None and progress.enabled(terminal):
                from .progress_bar import ProgressBar
                bar = ProgressBar(total, "images (starting Ray)", stream=terminal)
            if bar is not None:
                bar.what = "images" if done else "images (starting Ray)"
                bar.update(done)

        try:
            manifest = tinyclip_ray.embed_to_folder(paths, args.out, args.model, device=args.device,
                                                    dtype=args.dtype, batch_size=args.batch_size, workers=workers,
                                                    normalize=args.normalize, address=args.address,
                                                    retry_errors=not args.no_retry, wait_s=wait_s,
                                                    on_progress=on_progress)
        finally:
            if bar is not None:
                bar.close()
    summary = {"out": os.path.abspath(args.out), "count": manifest["count"], "errors": manifest["errors"],
               "dim": manifest["projection_dim"]}
    if args.json:
        say(json_text(summary))
    else:
        note = f"; {summary['errors']} unreadable (see the error column)" if summary["errors"] else ""
        say(f"{shown(summary['out'])}: {summary['count']} images x {summary['dim']} float32 embeddings{note}")
    return 0


class RayJobError(TinyClipError, RuntimeError):
    """Ray failed while embedding (a worker died for good, the cluster went away); Ray's log says why."""


def log_folder() -> pathlib.Path:
    from ..cachedir import cache_root
    return cache_root() / "ray-logs"


@contextlib.contextmanager
def ray_output_to_log(connects=lambda: 0):
    """Send this process's stderr (file descriptor 2, which Ray's C++ core and its Python loggers
    write to) into a new log file while Ray runs; yields a stream on the real stderr for tinyclip's
    own output. Python warnings go there too. An error raised inside is written to the log with its
    traceback and names the log file, once Ray was used (`connects()` grew) or wrote to it; a Ray
    failure that is not tinyclip's own error becomes one line."""
    folder = log_folder()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        raise UsageError(f"{folder}: cannot write Ray's log there ({e.strerror or e}); set TINYCLIP_CACHE_DIR "
                         "to a writable folder") from None
    _prune(folder, keep=KEEP_LOGS - 1)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        own = sys.stderr.fileno() != 2      # sys.stderr replaced by a caller (a test's capture): keep it
    except (AttributeError, OSError, ValueError):
        own = True
    terminal = sys.stderr if own else os.fdopen(os.dup(saved), "w", encoding=sys.stderr.encoding or "utf-8",
                                                errors="backslashreplace", buffering=1)
    os.dup2(fd, 2)
    os.close(fd)
    shown, warnings.showwarning = warnings.showwarning, _to(terminal, warnings.showwarning)

    before = connects()

    def named(message: str) -> str:
        if not (path.stat().st_size or connects() > before):
            return message
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as log:
            traceback.print_exc(file=log)       # after Ray's own lines
        return f"{message} (Ray's log: {path})"

    try:
        yield terminal
    except TinyClipError as e:
        raise type(e)(named(str(e))) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:      # Ray's own exceptions (a task or actor that failed for good, a lost cluster)
        raise RayJobError(named(f"the Ray job failed: {type(e).__name__}: "
                                f"{next((ln for ln in str(e).splitlines() if ln.strip()), '')[:300]}")) from None
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if terminal is not sys.stderr:
            terminal.close()
        warnings.showwarning = shown
        if not path.stat().st_size:
            path.unlink(missing_ok=True)


def _to(stream, show):
    """`warnings.showwarning` `show`, writing to `stream` unless told otherwise (on a line of its own
    when a progress bar is drawn there)."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        if file is None and stream.isatty():
            stream.write("\r\033[K")
        show(message, category, filename, lineno, file if file is not None else stream, line)
    return showwarning


def _prune(folder: pathlib.Path, keep: int) -> None:
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in logs[keep:]:
        old.unlink(missing_ok=True)
