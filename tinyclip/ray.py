"""Embed large image collections with Ray Data, on one machine or a cluster.

    import ray, tinyclip.ray
    ds = tinyclip.ray.embed_images(["a.jpg", "b.png"], "openai/clip-vit-base-patch32")
    for batch in ds.iter_batches(batch_format="numpy"):
        batch["path"], batch["embedding"], batch["error"]

The pipeline has two stages: `preprocess_batch` decodes and preprocesses images in CPU tasks (as
many as there are free CPUs), and `ImageEmbedder` encodes the pixels in a pool of actors, each
loading the model once (one GPU each on CUDA). `embed_to_folder` runs it into a resumable folder
of Parquet shards (tinyclip.shards); it is what `tinyclip embed SRC --out DIR --engine ray` runs.

Ray is an optional dependency (`pip install 'tinyclip[ray]'`); `import tinyclip` never imports it.
"""
from __future__ import annotations

import io
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from typing import Callable, Iterable

import numpy as np

from .errors import MissingDependencyError, TinyClipError

try:
    import ray
    import ray.data
except ImportError:
    raise MissingDependencyError("Ray is not installed; for --engine ray and tinyclip.ray run: "
                                 "pip install 'tinyclip[ray]'") from None

from . import checkpoints, hub, identity, shadow, shards
from .preprocess import ImageProcessor, load_image
from .tasks import UsageError

DEFAULT_BATCH_SIZE = 32
DEFAULT_SHARD_ROWS = 1024     # rows per Parquet shard: what a killed driver may have to redo
ACTOR_BASE_MEMORY = 512 << 20   # an actor's Python, Ray and tinygrad before the weights (~370 MiB measured)
ACTOR_WEIGHT_COPIES = 2          # the weights once as read, once as the model holds them (panels, float16)
DECODE_CPUS = 1                  # per decoding task
NO_ERROR = ""                 # the `error` column between stages: a string column, empty when the file was read
RESOURCE_WAIT_S = 120.0          # how long a job waits for CPUs/GPUs that other jobs hold before giving up
RESOURCE_POLL_S = 0.5


class ImageEmbedder:
    """A callable class for `ray.data.Dataset.map_batches`: image embeddings of a batch of rows.

    Parameters
    ----------
    model : hub id or local folder, as `tinyclip.load`; loaded once per actor.
    device, dtype, revision : as `tinyclip.load`.
    batch_size : images per forward pass.
    normalize : return unit-length embeddings.

    Each batch (a dict of numpy arrays) needs one of the columns `pixels` (N, C, S, S) float32 from
    `preprocess_batch`, `bytes` (the encoded files) or `path`. It is returned with its other
    columns, without `pixels` and `bytes`, plus `embedding` (N, projection_dim) float32 and `error`
    (a string, empty where the image was embedded). A row that cannot be read gets the reason in
    `error` and NaN in `embedding`; the run goes on.
    """

    def __init__(self, model: str = hub.DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE, *, revision: str | None = None, normalize: bool = False):
        from tinygrad.helpers import CACHELEVEL, PARALLEL
        from .api import load
        # No tinygrad compile pool in an actor: Ray owns the actor's lifetime, and the pool's spawned
        # processes outlived killed actors and hung the exit of finished ones (the pool's lock held by
        # a child Ray had already killed). Compiling in the actor itself then meets tinygrad's sqlite
        # compile cache, whose connection may only be used by the thread that opened it, and Ray
        # Data calls the actor from another thread than __init__: so that cache is off too. An actor
        # compiles each kernel once; tinyclip's graph cache (TINYCLIP_CACHE_DIR) spares later actors.
        PARALLEL.value, CACHELEVEL.value = 0, 0
        self.clip = load(model, device=device, dtype=dtype, revision=revision)
        self.batch_size, self.normalize = batch_size, normalize
        self.dim = self.clip.config.projection_dim

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        if "pixels" not in batch:
            batch = preprocess_batch(batch, self.clip.processor)
        pixels = batch.pop("pixels")
        errors = batch["error"]
        good = np.flatnonzero(errors == NO_ERROR)
        embedding = np.full((len(errors), self.dim), np.nan, np.float32)
        if len(good):
            embedding[good] = self.clip.encode_image(pixels[good], normalize=self.normalize, batch_size=self.batch_size)
        batch["embedding"] = embedding
        return batch


def preprocess_batch(batch: dict, processor: ImageProcessor) -> dict:
    """Decode and preprocess a batch of images for `ImageEmbedder` (a function for `map_batches`).

    Takes a `bytes` column (encoded image files) or a `path` column; returns the batch without
    `bytes`, plus `pixels` (N, C, S, S) float32 (zeros where unreadable) and `error` (empty string,
    or why the image could not be read). An `error` already set on a row is kept.
    """
    batch = dict(batch)
    data = batch.pop("bytes", None)
    if data is None and "path" not in batch:
        raise UsageError(f"a batch needs a 'path' or 'bytes' column; it has {', '.join(batch)}")
    n = len(data if data is not None else batch["path"])
    errors = [str(e) for e in batch["error"]] if "error" in batch else [NO_ERROR] * n
    pixels: list[np.ndarray | None] = [None] * n
    for i in range(n):
        if errors[i] != NO_ERROR:
            continue
        # a path is a str, or bytes (os.fsencode, as embed_to_folder passes them: any file name is exact)
        path = os.fsdecode(batch["path"][i]) if "path" in batch else None
        name = shards.shown(path) if path is not None else f"image {i} of the batch"
        try:
            image = _decode(data[i], name) if data is not None else load_image(path)
            pixels[i] = processor(image)[0]
        except Exception as e:      # one bad file must never end a long run
            reason = str(e)
            for prefix in (f"{name}: ", f"{path}: "):
                if reason.startswith(prefix):
                    reason = reason[len(prefix):]
            errors[i] = reason or type(e).__name__
    shape = next((p.shape for p in pixels if p is not None), None) or _pixel_shape(processor)
    batch["pixels"] = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels]) \
        if n else np.zeros((0, *shape), np.float32)
    batch["error"] = np.array(errors, dtype=object)
    return batch


def _decode(data, name: str):
    """A PIL image from the bytes of an image file, read as `load_image` reads a path."""
    from PIL import Image, UnidentifiedImageError
    from .errors import ImageError
    if data is None or len(data) == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes), not an image")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (unknown format, or a damaged header)") from None
    try:
        image.load()
    except Exception as e:
        raise ImageError(f"{name}: the image is truncated or corrupt ({type(e).__name__}: {e})") from None
    return load_image(image)


def _pixel_shape(processor: ImageProcessor) -> tuple[int, ...]:
    return processor(np.zeros((8, 8, 3), np.uint8)).shape[1:]


def embed_images(paths_or_dataset, model: str = hub.DEFAULT_MODEL, *, device: str | None = None,
                 dtype: str | None = None, revision: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 workers: int = 1, normalize: bool = False, num_gpus: float | None = None,
                 wait_s: float = RESOURCE_WAIT_S) -> "ray.data.Dataset":
    """The Ray Data pipeline that embeds images: decoding in CPU tasks, encoding in an actor pool.

    Parameters
    ----------
    paths_or_dataset : an iterable of image paths (str, UTF-8; or bytes, `os.fsencode`, for any
        file name), or a `ray.data.Dataset` with a `path` (str or bytes) or `bytes` column (other
        columns are passed through).
    model, device, dtype, revision : as `tinyclip.load`; every actor loads the model, so a local
        folder must exist on every node (hub ids are fetched into each node's cache).
    batch_size : images per task and per forward pass.
    workers : encoding actors.
    normalize : unit-length embeddings.
    num_gpus : GPUs per actor; default 1 when `device` is "cuda" or "nv", or when `device` is None
        and the cluster has GPUs; else 0.
    wait_s : how long to wait for the CPUs (or GPUs) the pool needs to be free, where other jobs hold
        them; ResourcesBusyError after that (0: at once).

    Returns
    -------
    ray.data.Dataset (lazy) with the input columns (less `bytes`) plus `embedding`
    (projection_dim float32, NaN where unreadable) and `error` (empty string, or the reason).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be a positive integer, got {workers!r}")
    folder = hub.locate(model, revision=revision)
    checkpoint = checkpoints.open(folder)
    processor = checkpoint.image_processor()
    if isinstance(paths_or_dataset, ray.data.Dataset):
        ds = paths_or_dataset
    else:
        rows = [{"path": _arrow_path(p)} for p in paths_or_dataset]
        ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    if num_gpus is None:
        num_gpus = 1 if _wants_gpu(device) else 0
    _check_room(workers, num_gpus, wait_s)
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"processor": processor}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=DECODE_CPUS)
    # `memory` tells Ray what an actor holds (the weights, tinygrad, its batches) so that a node is not
    # packed with more actors than fit. Being a resource the decode tasks do not ask for, it also
    # keeps Ray Data from fusing decoding into the actors: decoding stays in tasks on the free CPUs.
    actor_memory = ACTOR_BASE_MEMORY + ACTOR_WEIGHT_COPIES * sum(f.stat().st_size for f in checkpoint.weight_files())
    ds = ds.map_batches(ImageEmbedder, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        num_cpus=0 if num_gpus else 1, num_gpus=num_gpus, memory=actor_memory,
                        fn_constructor_kwargs=dict(model=model, device=device, dtype=dtype, batch_size=batch_size,
                                                   revision=revision, normalize=normalize))
    # A killed actor is restarted and its batch run again: Ray Data's actor pools default to
    # max_restarts=-1, max_task_retries=-1 (passing them ourselves is deprecated in Ray 2.60);
    # tests/test_ray.py kills an actor to check that this still holds.
    return ds


def _arrow_path(p):
    """A path for a Ray Data `path` column: bytes as they are; a str must be UTF-8 (Arrow's strings are),
    so a name that is not gets a one-line error saying to pass bytes."""
    p = os.fspath(p)
    if isinstance(p, str):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError(f"{shards.shown(p)}: the file name is not UTF-8; pass paths as bytes (os.fsencode) "
                             "to embed it") from None
    return p


class ResourcesBusyError(TinyClipError, RuntimeError):
    """The Ray cluster has the CPUs or GPUs a job needs, but other jobs held them for longer than the wait."""


def _needs(workers: int, num_gpus: float) -> dict[str, float]:
    """What the actor pool and one decoding task hold: each actor a CPU (or its GPUs), decoding a CPU."""
    return {"GPU": workers * num_gpus, "CPU": DECODE_CPUS} if num_gpus else {"CPU": workers + DECODE_CPUS}


def _check_room(workers: int, num_gpus: float, wait_s: float = 0) -> None:
    """Refuse a pool the cluster cannot hold, and wait (up to `wait_s`, saying so) for one that other
    jobs hold the resources of: Ray would otherwise wait forever without a word."""
    if not ray.is_initialized():
        connect()
    have = ray.cluster_resources()
    if num_gpus and workers * num_gpus > have.get("GPU", 0):
        raise UsageError(f"--workers {workers}: each worker asks for {num_gpus:g} GPU, the Ray cluster has "
                         f"{have.get('GPU', 0):g}; use fewer workers, or add GPU machines")
    if not num_gpus and workers + DECODE_CPUS > have.get("CPU", 0):
        raise UsageError(f"--workers {workers}: each worker takes a CPU and decoding needs {DECODE_CPUS} more, "
                         f"the Ray cluster has {have.get('CPU', 0):g} CPUs; use --workers "
                         f"{max(1, int(have.get('CPU', 0) - DECODE_CPUS))}, or add machines")
    need = _needs(workers, num_gpus)
    deadline = time.monotonic() + wait_s
    warned = False
    while True:
        free = ray.available_resources()
        short = {k: v for k, v in need.items() if free.get(k, 0) + 1e-9 < v}
        if not short:
            return
        busy = ", ".join(f"{free.get(k, 0):g} of {have.get(k, 0):g} {k}s free, {v:g} needed" for k, v in short.items())
        if time.monotonic() >= deadline:
            raise ResourcesBusyError(f"the Ray cluster is busy: {busy} after waiting {wait_s:g} s (other jobs hold "
                                     "the rest); run again when they finish, use fewer --workers, or add machines")
        if not warned:
            warnings.warn(f"the Ray cluster is busy ({busy}); waiting up to {wait_s:g} s for other jobs to "
                          "free them", stacklevel=3)
            warned = True
        time.sleep(RESOURCE_POLL_S)


def _wants_gpu(device: str | None) -> bool:
    if device is not None:
        return device.split(":")[0].lower() in ("cuda", "nv")
    if not ray.is_initialized():
        connect()          # as Ray Data itself would on first use
    return ray.cluster_resources().get("GPU", 0) > 0


_private_dir: str | None = None       # the temporary folder of the private Ray `connect` started
connects = 0                          # calls of `connect` in this process (the CLI's log names them)


def connect(address: str | None = None) -> bool:
    """Use the running Ray of this process, or connect to `address` ("auto", "ray://host:port",
    "host:port", else $RAY_ADDRESS), or, with neither, start a private Ray on this machine; returns
    whether a private Ray was started (the caller then ends it with `disconnect`).

    A private Ray is a new local cluster in a temporary folder of its own: it never joins a cluster
    that is already running here (another user's, or one `ray start` left), as `ray.init()` would.
    """
    global connects
    connects += 1
    if ray.is_initialized():
        return False
    if (found := shadow.shadowing_folder()) is not None:     # Ray's workers import from the current folder
        raise UsageError(shadow.explain(found, "Ray's workers"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    options = dict(logging_level=logging.WARNING, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UsageError(f"--address {address}: cannot connect to Ray ({_first_line(e)}); start one with "
                             "`ray start --head`, or leave --address out (and unset RAY_ADDRESS) for a private "
                             "local Ray") from None
        return False
    global _private_dir
    # Short and private: Ray's socket paths under it must fit in 107 bytes, and no one else may use it.
    _private_dir = tempfile.mkdtemp(prefix="tinyclip-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        ray.init(address="local", include_dashboard=False, _temp_dir=_private_dir, **options)
    except Exception as e:
        disconnect()
        raise RayStartError(f"cannot start a local Ray ({type(e).__name__}: {_first_line(e)})") from None
    return True


def disconnect() -> None:
    """End the private Ray `connect` started, and remove its temporary folder."""
    global _private_dir
    if ray.is_initialized():
        ray.shutdown()
    if _private_dir is not None:
        shutil.rmtree(_private_dir, ignore_errors=True)
        _private_dir = None


class RayStartError(TinyClipError, RuntimeError):
    """A private local Ray could not be started."""


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def embed_to_folder(paths: Iterable, out, model: str = hub.DEFAULT_MODEL, *, device: str | None = None,
                    dtype: str | None = None, revision: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    workers: int = 1, normalize: bool = False, address: str | None = None,
                    shard_rows: int = DEFAULT_SHARD_ROWS, retry_errors: bool = True,
                    wait_s: float = RESOURCE_WAIT_S,
                    on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Embed the images at `paths` into the output folder `out` (tinyclip.shards), skipping those
    already there; returns the folder's manifest.

    Files are matched by absolute path, size and mtime: a re-run after an interruption embeds only
    what is missing or changed, and (with `retry_errors`, the default) the files that could not be
    read last time. Paths may be str or bytes; any file name is stored exactly. `on_progress(done,
    total)` is called once before Ray starts (done 0) and after each batch (`total` counts this
    run's files). Other parameters as `embed_images`; `address` as `connect` (a private Ray started
    here is ended on return).

    Raises
    ------
    OutputFolderError
        `out` holds another model's, dtype's or normalisation's embeddings, or other files, or another
        run is writing to it.
    """
    folder = hub.locate(model, revision=revision)
    config = checkpoints.open(folder).config
    hub_id = None if os.path.isdir(os.path.expanduser(os.fspath(model))) else str(model)
    wanted = shards.manifest_for(identity.of_checkpoint(folder, hub_id, revision), dtype or "float32",
                                 config.projection_dim, normalize)
    with shards.ShardWriter(out, wanted, retry_errors=retry_errors) as writer:
        todo, unreadable = [], []
        for p in paths:
            try:
                key = shards.file_key(p)
            except OSError as e:
                key = (os.fsencode(os.path.abspath(p)), -1, -1)
                if not writer.is_done(key):
                    unreadable.append((key, f"cannot read the file ({e.strerror or e})"))
                continue
            if not writer.is_done(key):
                todo.append({"path": key[0], "size": key[1], "mtime": key[2]})
        if unreadable:
            keys, reasons = zip(*unreadable)
            writer.write([k[0] for k in keys], [-1] * len(keys), [-1] * len(keys),
                         np.zeros((len(keys), config.projection_dim), np.float32), list(reasons))
        if todo:
            if on_progress is not None:
                on_progress(0, len(todo))
            started = connect(address)
            try:
                _run(todo, writer, model, device=device, dtype=dtype, revision=revision, batch_size=batch_size,
                     workers=workers, normalize=normalize, shard_rows=shard_rows, wait_s=wait_s,
                     on_progress=on_progress)
            finally:
                if started:
                    disconnect()
        return writer.finish()


def _run(todo: list[dict], writer: shards.ShardWriter, model: str, *, shard_rows: int, on_progress, **options):
    """Embed the `todo` rows through the pipeline into `writer`, a shard per `shard_rows` rows."""
    batch_size = options["batch_size"]
    ds = ray.data.from_items(todo, override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
    ds = embed_images(ds, model, **options)
    pending: list[dict] = []
    held = done = 0

    def flush():
        nonlocal held
        if pending:
            cat = {k: [x for b in pending for x in b[k]] for k in ("path", "size", "mtime", "error")}
            writer.write(cat["path"], cat["size"], cat["mtime"], np.concatenate([b["embedding"] for b in pending]),
                         cat["error"])
            pending.clear()
            held = 0

    for batch in ds.iter_batches(batch_size=min(batch_size, shard_rows), batch_format="numpy"):
        pending.append({"path": [bytes(p) for p in batch["path"]], "size": batch["size"], "mtime": batch["mtime"],
                        "embedding": batch["embedding"],
                        "error": [None if e == NO_ERROR else str(e) for e in batch["error"]]})
        held += len(batch["path"])
        done += len(batch["path"])
        if held >= shard_rows:
            flush()
        if on_progress is not None:
            on_progress(done, len(todo))
    flush()


def quiet_logs() -> None:
    """For the command line: Ray Data's warnings, but not its INFO lines (execution plans, where its
    logs are, progress written as log lines when stderr is not a terminal), nor its progress bars
    (the command line draws its own, of images done)."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with warnings.catch_warnings():      # making the context warns of Ray's own deprecated defaults
        warnings.simplefilter("ignore")
        ray.data.DataContext.get_current().enable_progress_bars = False
