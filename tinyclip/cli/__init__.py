"""The `tinyclip` command: one module per subcommand, each with register(subparsers).

    tinyclip backends [--json]
    tinyclip classify IMAGE... --labels L1 L2 ...
    tinyclip embed PATH... --out FILE.npz
    tinyclip search QUERY --images FOLDER_OR_NPZ
    tinyclip tune [MODEL] [--batch 1,32] [--text-length 8,16] [--beam 2]

Errors print as one line, `tinyclip: error: ...`, with exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import TinyClipError, UsageError


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options every model-using subcommand shares."""
    from ..hub import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="backend name or tinygrad device (default: best available; "
                   "see `tinyclip backends`)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16"], help="default: the backend's default")
    p.add_argument("--batch-size", type=int, default=32, help="images or texts per forward pass (default: 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def load_model(args: argparse.Namespace):
    """The CLIP the model options name."""
    from ..api import load
    return load(args.model, device=args.device, dtype=args.dtype)


def check_batch_size(args: argparse.Namespace) -> int:
    """--batch-size, checked before the model loads."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
    return args.batch_size


def print_json(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: each command module imports add_model_options from this package.
    from . import backends, classify, embed, search, tune
    from .. import __version__
    parser = argparse.ArgumentParser(prog="tinyclip", description="CLIP in tinygrad: embeddings, zero-shot "
                                     "classification and search on CPU, OpenCL, CUDA or Metal.")
    parser.add_argument("--version", action="version", version=f"tinyclip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (backends, classify, embed, search, tune):
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except TinyClipError as e:
        print(f"tinyclip: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tinyclip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
