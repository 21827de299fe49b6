"""`tinyclip tune`: beam-search the encoders' kernels once, and keep the tuned graphs.

    tinyclip tune                                        # the default model, best backend, batches 1 and 32
    tinyclip tune ./my-clip --device cpu --batch 1,8,32 --text-length 8,16 --beam 2

Each chosen graph (image tower per batch bucket, text tower per batch bucket and text length) is
captured under tinygrad's BEAM=n, which times candidate kernels on the device and keeps the
fastest, and is stored in the graph cache (tinyclip/graph_cache/) marked tuned. Later processes
with the same model architecture, backend and dtype load the tuned graphs and search nothing; an
ordinary run never replaces a tuned graph with an untuned one, and running tune again does.
tinygrad also keeps the search results in its own kernel cache. The image graphs tuned are those
that images given as files, PIL images or uint8 arrays run (uint8 crops normalised in the graph),
not those of already preprocessed pixel values.

Arguments are checked before the model loads, so a typo fails at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError
from . import DEFAULT_BATCH_SIZE, add_model_options, check_batch_size, check_device
from .terminal import json_text, say

DEFAULT_BATCHES = "1,32"
DEFAULT_TEXT_LENGTHS = "8,10,12"
DEFAULT_BEAM = 2

EPILOG = f"""\
examples:
  tinyclip tune                                          # default model and backend, BEAM=2
  tinyclip tune ./my-clip --device cpu --batch 1,8,32
  tinyclip tune openai/clip-vit-base-patch32 --only text --text-length 8,16,24 --beam 4

A batch of n runs in the graph of the smallest power of two >= n, capped at the --batch-size it is
run with (`tinyclip embed --batch-size 32` with 32 images: 32; with 5: 8); tune the batches you
run. A text runs at the length up to its end token rounded up to a step of 2 positions up to 20,
4 up to 40 and 8 beyond, or at the context length (77 for OpenAI's CLIPs): prompts like "a photo
of a dog" run at 8, most captions at 12 to 24. Graphs are stored per model architecture, backend
and dtype under $TINYCLIP_CACHE_DIR/graphs (default: ~/.cache/tinyclip/graphs); a search takes
minutes per graph for ViT-B/32 on a CPU. Defaults: --batch {DEFAULT_BATCHES}, --text-length {DEFAULT_TEXT_LENGTHS},
--beam {DEFAULT_BEAM}.
"""


def register(subparsers) -> None:
    from ..hub import DEFAULT_MODEL
    p = subparsers.add_parser("tune", help="beam-search the kernels once and keep the tuned graphs",
                              description="Search for faster kernels (tinygrad's BEAM) for the chosen batch "
                                          "sizes and text lengths, and store the tuned graphs so that later "
                                          "runs use them without searching.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help=f"hub id or local folder (default: {DEFAULT_MODEL}); the same as --model")
    add_model_options(p, batch_help=f"the --batch-size you run embed, classify and search with (default: "
                                    f"{DEFAULT_BATCH_SIZE}): the default buckets are 1 and it, and larger "
                                    "buckets never run")
    p.set_defaults(model=None)     # so that run() can tell --model given from not
    p.add_argument("--backend", dest="device", default=None, help=argparse.SUPPRESS)   # the old name of --device
    p.add_argument("--batch", default=None, metavar="N,N,...",
                   help=f"batch buckets to tune (default: 1 and --batch-size, i.e. {DEFAULT_BATCHES})")
    p.add_argument("--text-length", default=DEFAULT_TEXT_LENGTHS, metavar="L,L,...",
                   help=f"text lengths to tune: 4, 6, 8, ... (the lengths texts run at, see below, up to the "
                        f"context length), or 'all' (default: {DEFAULT_TEXT_LENGTHS})")
    p.add_argument("--beam", type=int, default=DEFAULT_BEAM, metavar="N",
                   help=f"beam width: larger searches longer for faster kernels (default: {DEFAULT_BEAM})")
    p.add_argument("--only", choices=["image", "text"], default=None, help="tune one tower only")
    p.set_defaults(run=run)


def run(args) -> int:
    from .. import graph_cache
    from ..hub import DEFAULT_MODEL
    if args.model_positional and args.model and args.model_positional != args.model:
        raise UsageError(f"two models given: {args.model_positional} and --model {args.model}; give one")
    name = args.model_positional or args.model or DEFAULT_MODEL
    batch_size = check_batch_size(args)
    batches = _positive_ints(args.batch, "--batch") if args.batch else sorted({1, batch_size})
    if max(batches) > batch_size:
        raise UsageError(f"--batch {args.batch}: buckets above --batch-size {batch_size} never run (a batch is "
                         f"capped at --batch-size); raise --batch-size or drop them")
    if args.beam < 1:
        raise UsageError(f"--beam must be at least 1, got {args.beam}")
    if not graph_cache.enabled():
        raise UsageError(f"the graph cache is switched off ({graph_cache.ENV_DISABLE}="
                         f"{os.environ.get(graph_cache.ENV_DISABLE)}); tune stores its result there")
    lengths = None if args.text_length.strip().lower() == "all" else _positive_ints(args.text_length, "--text-length")
    from .. import hub
    from ..api import load
    from ..config import CLIPConfig
    backend = check_device(args)
    folder = hub.locate(name, revision=args.revision, cache_dir=args.cache_dir)
    keys = _keys(CLIPConfig.from_file(folder / "config.json"), batches, lengths, args.only)
    with backend.context():     # the CPU kernels' tiles first: the graphs below are compiled for what it chooses
        if (chosen := backend.kernel_set().tune_machine()) is not None:
            print(f"measured this machine's kernel shapes: {chosen}", file=sys.stderr, flush=True)
    model = load(folder, device=args.device, dtype=args.dtype, allow_tf32=args.tf32, image_size=args.image_size)
    # images given as files go up as uint8 crops, to the graph that normalises them: tune that one
    keys = [model.runner.image_key(key[1], model.image_scaling()) if key[0] == "image" else key for key in keys]

    done, failed = [], 0
    for key in keys:
        what = _describe(key)
        say(f"tuning {what} (BEAM={args.beam}) ...", file=sys.stderr, flush=True)
        seconds, path = model.runner.tune(key, args.beam)
        if path is None:
            failed += 1
            say(f"tinyclip: warning: {what}: tuned in {seconds:.1f} s but not stored (see the warning above)",
                  file=sys.stderr)
            continue
        size = path.stat().st_size
        done.append({"tower": key[0], "batch": key[1], "text_length": key[2] if key[0] == "text" else None,
                     "input": ("float32 pixels" if len(key) == 2 else "uint8 crops") if key[0] == "image" else None,
                     "beam": args.beam, "seconds": round(seconds, 2), "path": str(path), "bytes": size})
        if not args.json:
            say(f"{what}: tuned in {seconds:.1f} s -> {path} ({size / 1e6:.1f} MB)", flush=True)
    if args.json:
        say(json_text(done))
    elif done:
        say(f"later runs of {name} on {model.device} ({model.dtype}) load these {len(done)} tuned graphs")
    if failed:
        raise UsageError(f"{failed} of {len(keys)} tuned graphs could not be stored in {model.runner.graphs.folder}")
    return 0


def _keys(config, batches: list[int], lengths: list[int] | None, only: str | None) -> list[tuple]:
    """The runner keys to tune, after checking the text lengths against the config's context length."""
    from ..runner import text_lengths
    context = config.text_config.max_position_embeddings
    valid = text_lengths(context)
    if lengths is None:
        lengths = valid
    for length in lengths:
        if length not in valid:
            raise UsageError(f"--text-length {length}: texts of this model run at lengths "
                             f"{', '.join(map(str, valid))} (up to the context length {context})")
    keys = [] if only == "text" else [("image", b) for b in batches]
    if only != "image":
        keys += [("text", b, length) for b in batches for length in lengths]
    return keys


def _describe(key: tuple) -> str:
    return f"image batch {key[1]}" if key[0] == "image" else f"text batch {key[1]} length {key[2]}"


def _positive_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: expected comma-separated whole numbers, e.g. 1,32") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} {text}: expected comma-separated positive numbers, e.g. 1,32")
    return list(dict.fromkeys(values))
