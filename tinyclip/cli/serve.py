"""`tinyclip serve`: a local search page over a collection (tinyclip.server), served by uvicorn.

Arguments and the collection are checked, and the port is bound, before the model loads, so a typo
or a busy port fails at once with one line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import sys

import numpy as np

from .. import index, progress, tasks
from ..errors import MissingDependencyError, UsageError
from . import add_model_options, check_batch_size, check_device, collection, load_model
from .progress_bar import ProgressBar

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
GRACEFUL_SHUTDOWN_S = 5         # requests still running when asked to stop get this long to finish

SERVE_EPILOG = """\
examples:
  tinyclip serve photos.index                 # an index from `tinyclip index`
  tinyclip serve photos.npz --port 8080       # an .npz from `tinyclip embed`
  tinyclip serve photos/                      # a folder: embedded first (a progress bar), kept in memory

Then open http://127.0.0.1:8000/ : search by text, by an uploaded or dropped
image, click a result for more like it, classify an image over labels you type.
The JSON API (GET /api/search?q=...&k=..., POST /api/search with an image,
POST /api/classify, GET /api/thumbnail/ID) is described in the README. It listens
on 127.0.0.1 only, and answers only requests addressed to localhost; --host
0.0.0.0 opens it to the network (no password: anyone who reaches it sees your
images). --port 0 takes a free port; the address is printed when it is ready
(with --json as {"url": ..., "count": ...}).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="a local web page to search a collection and classify images",
                              description="Serve a search page and JSON API over an index, an .npz or a folder "
                                          "of images.", epilog=SERVE_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("collection", metavar="COLLECTION", help="an index from `tinyclip index`, an .npz from "
                   "`tinyclip embed`, a folder from `embed --engine ray`, or a folder of images")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"the address to listen on (default: {DEFAULT_HOST}, "
                   "this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}; 0 takes a free one")
    p.add_argument("--allow-other-model", action="store_true",
                   help="serve embeddings made with other weights or another dtype, with a warning")
    add_model_options(p, batch_help="images per forward pass when a folder is embedded, and label prompts "
                                    "per pass when classifying (default: 32)")
    p.set_defaults(run=run_serve)


def run_serve(args) -> int:
    try:
        import uvicorn
        from ..server.app import create_app
    except ImportError:
        raise MissingDependencyError("tinyclip serve needs starlette and uvicorn: pip install 'tinyclip[search]'") \
            from None
    from ..server.collection import InMemory, Indexed
    source = args.collection
    kind = collection.kind_of(source, "COLLECTION")
    batch_size = check_batch_size(args)
    backend = check_device(args)
    dtype = backend.check_dtype(args.dtype)
    stored = meta = None
    if kind == collection.INDEX:
        meta = index.read_meta(source)
        collection.check_same_model(meta["model"], meta["dtype"], args, f"COLLECTION {source}", dtype,
                                    command="server")
        index.faiss()
    elif kind != collection.IMAGES:
        stored = collection.read_embeddings(source, kind, "COLLECTION")
        collection.check_same_model(stored.identity, stored.dtype, args, f"COLLECTION {source}", dtype,
                                    stored.old_model, command="server")
    sock = _bind(args.host, args.port)
    try:
        model = load_model(args)
        model.tokenizer     # read now: a problem with its files stops the server before a folder is embedded
        if kind == collection.INDEX:
            searched = Indexed(index.read(source, meta))
        elif stored is not None:
            searched = InMemory(stored.embeddings, stored.paths)
        else:
            embeddings, paths = _embed_folder(model, source, batch_size)
            searched = InMemory(embeddings, paths, root=source)
        if searched.dim != model.config.projection_dim:
            raise UsageError(f"COLLECTION {source}: embeddings have {searched.dim} dimensions, the model "
                             f"{args.model} gives {model.config.projection_dim}; embed again with this --model")
        _warm_up(model)
        app = create_app(model, searched, cwd=os.getcwd(), loopback_only=_is_loopback(args.host),
                         batch_size=batch_size)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        if args.json:
            print(json.dumps({"url": url, "count": len(searched), "kind": searched.kind}), flush=True)
        else:
            print(f"serving {len(searched):,} images from {source} at {url} (Ctrl+C stops)", flush=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        _server_class()(config).run(sockets=[sock])
    finally:
        sock.close()
        _end_children()
    return 0


def _end_children() -> None:
    """Compile workers forked while a request compiled a graph inherit uvicorn's SIGTERM handler (which
    only sets a flag), so a shutdown in the middle of a compile would leave them running: end them."""
    for child in multiprocessing.active_children():
        child.kill()


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, ending this process's children before uvicorn re-raises the signal that
        stopped it (which ends this process before any `finally` of ours could run)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:
                    _end_children()
    return Server


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made here so that a busy port is a one-line error before the
    model loads, and so that --port 0 can report the port it got."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: a port is 0 (any free one) to 65535")
    try:
        family, type_, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pass another "
                         "--port, or --port 0 for any free one") from None
    return sock


def _is_loopback(host: str) -> bool:
    from ..server.app import is_loopback_host
    return is_loopback_host(f"[{host}]" if ":" in host else host)


def _embed_folder(model, folder: str, batch_size: int) -> tuple[np.ndarray, list[str]]:
    """The unit embeddings of a folder's images, with a progress bar; unreadable files are skipped."""
    total = sum(1 for _ in tasks.find_images([folder]))
    bar = ProgressBar(total, "images")
    rows, paths, skipped = [], [], 0

    def skip(path, reason):
        nonlocal skipped
        skipped += 1
        bar.note(f"tinyclip: warning: {path}: skipped ({reason})")

    files = tasks.find_images([folder], on_error=skip)
    for batch, embeds in tasks.embed_image_files(model, files, batch_size=batch_size, normalize=True, on_skip=skip):
        rows.append(embeds)
        paths.extend(batch)
        bar.update(len(paths) + skipped, skipped)
    bar.close()
    if not paths:
        raise UsageError(f"COLLECTION {folder}: none of its image files could be read (see the warnings)")
    return np.concatenate(rows), paths


def _warm_up(model) -> None:
    """Compile (or load from the graph cache) the one-text and one-image graphs that queries run in,
    so that the first request does not wait for a compiler."""
    progress.status("preparing the query graphs ...")
    try:
        model.encode_text(["a photo"], normalize=True, batch_size=1)
        size = model.config.vision_config.image_size
        model.encode_image([np.zeros((size, size, 3), np.uint8)], normalize=True, batch_size=1)
    finally:
        progress.clear()
    sys.stderr.flush()
