"""The `tinyclip` command: one module per subcommand, each with register(subparsers).

    tinyclip backends [--json]
    tinyclip classify IMAGE... --labels L1 L2 ...
    tinyclip embed PATH... --out FILE.npz
    tinyclip index EMBEDDINGS --out INDEX
    tinyclip search QUERY --images FOLDER_NPZ_OR_INDEX
    tinyclip serve COLLECTION [--host 127.0.0.1] [--port 8000]
    tinyclip tune [MODEL] [--batch 1,32] [--text-length 8,16] [--beam 2]

Errors tinyclip finds print as one line, `tinyclip: error: ...`, with exit code 1. A command line
argparse cannot parse (an unknown option, a missing argument) keeps argparse's convention: the
subcommand's usage line, then the error, with exit code 2.
"""
from __future__ import annotations

import argparse
import atexit
import functools
import gc
import os
import sys
import time
import warnings

from .. import trace
from ..errors import BackendError, TinyClipError, UsageError
from ..trust import guard_kernel_cache
from .terminal import json_text, say

DEFAULT_BATCH_SIZE = 32
JSON_SIGNIFICANT_DIGITS = 6     # what a float32 score means; more digits are noise


def add_model_options(p: argparse.ArgumentParser, batch_help: str | None = None) -> None:
    """The options every model-using subcommand shares."""
    from ..hub import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (default: main)")
    p.add_argument("--cache-dir", default=None, metavar="FOLDER",
                   help="Hugging Face cache to find hub models in (default: huggingface_hub's, ~/.cache/huggingface)")
    p.add_argument("--device", default=None, help="backend name, 'gpu' (the best available accelerator) or a "
                   "tinygrad device (default: best available; see `tinyclip backends`)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "int8"],
                   help="default: the backend's default (float32). bfloat16 / int8: the linear layers in that dtype, "
                   "the rest float32 (the cpu backend on a CPU with avx512_bf16 / VNNI; faster, within README's "
                   "tolerances)")
    p.add_argument("--tf32", action="store_true", help="float32 matmuls on TF32 tensor cores (cuda and nv backends): "
                   "faster, not exact float32 (README: its tolerance); a warning elsewhere")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="run the image tower at N x N, position embeddings interpolated (a multiple of the patch "
                   "size; default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=batch_help or f"images or texts per forward pass (default: {DEFAULT_BATCH_SIZE})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def check_device(args: argparse.Namespace):
    """The backend --device and --dtype name, checked before the model loads: one-line errors that
    name the option and what to pass instead."""
    from .. import registry
    trace.imports()
    try:
        with trace.phase("backend") as said:
            backend = registry.select(args.device)
            said.append(f"{backend.name}, {backend.device}")
    except BackendError:
        option = f"--device {args.device}: " if args.device is not None else ""
        raise BackendError(option + registry.summary(args.device)) from None
    try:
        backend.check_dtype(args.dtype)
    except BackendError as e:
        from ..kernels import LINEAR_DTYPES
        if args.dtype in LINEAR_DTYPES:     # its reason (a missing CPU flag, another backend) says what to do
            raise BackendError(f"--dtype {args.dtype}: {e}") from None
        runs = ", ".join(backend.usable_dtypes)
        raise BackendError(f"--dtype {args.dtype}: backend {backend.name} does not run it here; it runs {runs}. "
                           "Pass --dtype one of those, or another --device") from None
    return backend


def load_model(args: argparse.Namespace):
    """The CLIP the model options name, with a status line while it loads (on a terminal)."""
    from .. import progress
    from ..api import load
    backend = check_device(args)
    progress.status(f"loading {args.model} ...")
    try:
        return load(args.model, device=backend, dtype=args.dtype, revision=args.revision,
                    cache_dir=args.cache_dir, allow_tf32=args.tf32,
                    image_size=args.image_size)
    finally:
        progress.clear()


def check_batch_size(args: argparse.Namespace) -> int:
    """--batch-size, checked before the model loads."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    return args.batch_size


def rounded(score: float) -> float:
    """A float32 score with the digits it means (JSON_SIGNIFICANT_DIGITS), not 17."""
    return float(f"{score:.{JSON_SIGNIFICANT_DIGITS}g}")


def print_json(value) -> None:
    say(json_text(value))


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: each command module imports helpers from this package.
    from . import backends, classify, embed, index, search, serve, tune
    from .. import __version__
    parser = argparse.ArgumentParser(prog="tinyclip", description="CLIP in tinygrad: embeddings, zero-shot "
                                     "classification and search on CPU, OpenCL, CUDA or Metal.")
    parser.add_argument("--version", action="version", version=f"tinyclip {__version__}")
    parser.add_argument("--trace", action="store_true", help="print where the start-up time goes: one line per "
                        "phase (imports, backend, weights, graphs, runs) with its seconds (also TINYCLIP_TRACE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (backends, classify, embed, index, search, serve, tune):
        command.register(sub)
    parser.commands = sub.choices     # name -> subparser, for errors in the subcommand's own words
    return parser


@functools.cache
def _exit_without_collecting() -> None:
    """The command is the whole process: at exit, the objects alive then are left out of Python's last garbage
    collection (gc.freeze), which over a model's tinygrad graphs (some hundred thousand objects) cost a
    one-image command 0.1-0.3 s after its answer. atexit handlers and weakref finalizers still run. load()
    does not do this: a library must not change when a host program's own objects are finalized."""
    atexit.register(gc.freeze)


def main(argv=None) -> int:
    from . import classify
    from .. import progress
    _exit_without_collecting()
    argv = sys.argv[1:] if argv is None else list(argv)
    argv, dashed_labels = classify.labels_after_dashes(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:     # argparse would answer with the top-level usage; the subcommand's is the useful one
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if dashed_labels:
        args.labels, args.dashed_labels = [*args.labels, *dashed_labels], dashed_labels
    if args.trace:
        os.environ[trace.ENV] = "1"
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            guard_kernel_cache()     # before any command's first tinygrad call (tinyclip.trust)
            return args.run(args) or 0
    except TinyClipError as e:
        progress.clear()
        say(f"tinyclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress.clear()
        say("tinyclip: interrupted", file=sys.stderr)
        return 130
    finally:
        if trace.enabled() and (started := trace.process_start()) is not None:
            trace.line(f"total {time.time() - started:.2f} s (since the process started)")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors, without Python's file and line."""
    from .. import progress
    progress.clear()
    say(f"tinyclip: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
