"""Running the encoders fast and exactly: shape buckets, a TinyJit per bucket,
text cut to the longest real length, and compiled graphs kept on disk.

- Batches are padded up to a power-of-two bucket (1, 2, 4, ... up to the batch
  size), so any batch size reuses a compiled graph; padded rows are dropped
  from the output. Rows never interact in CLIP, so this is exact.
- Texts run only up to the last position any row pools from, rounded up to the next of
  TEXT_LENGTHS: the causal mask means no position sees a later one, so the states up to there are
  exactly those of the full context.
- A batch may instead run padded in a bigger graph (more rows, a longer length) that is already
  compiled, where that costs less than compiling its own: batch_plan.py decides, for a whole job at
  once (a text job's rows sorted longest first, the order restored here). So a new user's first
  queries and label prompts compile a few graphs, not one per prompt length, and a job's last,
  partial batch runs in the bucket its full batches compiled.
- Images given as files, PIL images or uint8 arrays are uploaded as uint8 crops (N, S, S, C), the
  output of the processor's steps before the float ones; the graph converts and normalises them
  (tinyclip/pixels.py), a quarter of the bytes of float32 pixel values. Their graphs are keyed
  ("image", batch, "uint8-<the scaling's key>"); float32 pixel values run ("image", batch).
- Each batch is written by the host straight into a staging array of its bucket's size (two per
  bucket, used in turn; the bucket batch_plan.py chose), uploaded as it is: rows past the batch keep what an earlier batch left
  (or zeros) and are dropped. While the device encodes one batch, a thread fills the next
  (decoding and resizing in Pillow, which releases the GIL).
- Each (tower, batch bucket, text length) gets its own TinyJit, captured on
  its first call (tinygrad's default would run the encoder plain once and
  capture on the second, scheduling every kernel twice). Its kernels compile
  in forked workers (_tinygrad/compile_pool.py) where that is safe.
- The graph cache (tinyclip/graph_cache/) saves each captured graph, without
  the weights, and a later process loads it instead of capturing: its first
  embedding skips tinygrad's scheduling and code generation. `tinyclip tune`
  (Runner.tune) stores beam-searched graphs under the same keys.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Callable

import numpy as np

from . import _tinygrad, graph_cache, pooling, progress, trace
from .batch_plan import Planner
from .preprocess import PixelScaling

# Lengths a text batch runs at (and the context length): steps of 2 positions up to 20, where prompts
# like "a photo of a {label}." (8-10 tokens) live and a step is a large share of the work, then 4 up
# to 40 and 8 beyond; 19 lengths (each a graph to compile once) for a context of 77, as a step of 4
# would give, but never more than about 1/6 of the work spent on padding.
TEXT_LENGTHS = (*range(4, 20, 2), *range(20, 40, 4), *range(40, 512, 8))


def text_lengths(context: int) -> list[int]:
    """The lengths a text batch runs at: TEXT_LENGTHS below the context length, and it."""
    return [n for n in TEXT_LENGTHS if n < context] + [context]


class Runner:
    """Encodes numpy batches with a model; one per loaded CLIP, guarded by the process-wide
    _tinygrad.LOCK because tinygrad's scheduler, JIT and settings are process-wide and not thread-safe.

    jit=False runs every call plain (no TinyJit, no graph cache). cache=False, or the
    environment variable TINYCLIP_GRAPH_CACHE=0, keeps compiled graphs in memory only.
    tf32=True compiles float32 matmuls for TF32 tensor cores (a backend whose `tf32` is True).
    """

    def __init__(self, model, backend, jit: bool = True, cache: bool = True, tf32: bool = False, ready=None):
        self.model, self.backend, self.jit, self.tf32 = model, backend, jit, tf32
        # ready(tower) reads a tower's weights before its first run (tinyclip/towers.py); None: all are read
        self.ready = ready if ready is not None else (lambda tower: None)
        self.graphs = graph_cache.GraphStore(model, backend, tf32=tf32) if jit and graph_cache.enabled(cache) else None
        self._jits: dict[tuple, object] = {}
        self.account = self.graphs.account() if self.graphs is not None else None
        with self.context():
            costs = model.kernels.compile_costs()
        self.planner = Planner(self.compiled, self.account, costs)
        self._scalings: dict[str, PixelScaling] = {}    # uint8 image graphs' key part -> their float steps
        self.prefetch = True    # prepare the next image batch in a thread while this one runs (see images())
        self.lock = _tinygrad.LOCK     # process-wide: tinygrad's state is, not this model's

    @contextlib.contextmanager
    def context(self):
        """The backend's settings and this model's precision, under which every computation of it runs."""
        with self.backend.context(), _tinygrad.tf32_context(self.tf32):
            yield

    def image_key(self, batch: int, scaling: PixelScaling | None = None) -> tuple:
        """The key of the image graph for a batch bucket: of float32 pixel values (scaling None), or of
        uint8 crops that the graph turns into pixel values with `scaling`."""
        if scaling is None:
            return ("image", batch)
        name = f"uint8-{scaling.key()}"
        self._scalings[name] = scaling
        return ("image", batch, name)

    def _encoder(self, key: tuple):
        if key[0] == "text":
            return self.model.get_text_features
        if len(key) == 2:
            return self.model.get_image_features
        scaling = self._scalings[key[2]]
        return lambda crops: self.model.get_image_features(self.model.kernels.pixel_values(crops, scaling))

    def _input_shape(self, key: tuple) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of the input of the graph for `key`."""
        if key[0] == "text":
            return (key[1], key[2]), np.dtype(np.int32)
        v = self.model.config.vision_config
        if len(key) == 2:
            return (key[1], v.num_channels, v.image_size, v.image_size), np.dtype(np.float32)
        return (key[1], v.image_size, v.image_size, v.num_channels), np.dtype(np.uint8)

    def _run(self, key: tuple, x) -> np.ndarray:
        """The encoder's output for the input `x`: a numpy array, or a Staging (uploaded as it is)."""
        self.ready("text" if key[0] == "text" else "image")
        with self.lock, self.context():
            t = x.upload() if isinstance(x, _tinygrad.Staging) else _tinygrad.to_tensor(x, self.backend.device)
            if not self.jit:
                return _tinygrad.as_float32(self._encoder(key)(t))
            if (jit := self._jits.get(key)) is not None:
                return _tinygrad.to_numpy(jit(t))
            if (out := self._run_cached(key, t)) is not None:
                return out
            return self._capture(key, t)[0]

    def _run_cached(self, key: tuple, t) -> np.ndarray | None:
        """The output of the graph cached on disk for `key`, or None when there is none that runs."""
        if self.graphs is None:
            return None
        with trace.phase(f"graph {progress.graph_name(key)}: read from the graph cache"):
            jit = self.graphs.load(key)
        if jit is None:
            return None
        try:
            with trace.phase(f"graph {progress.graph_name(key)}: first run"):
                out = _tinygrad.to_numpy(jit(t))
        except _tinygrad.jit_error():   # raised before anything runs
            self.graphs.discard(key, "it was captured for inputs of another shape, dtype or device (JitError)")
            return None
        except Exception as e:   # a program that will not load or run here: capture afresh
            self.graphs.discard(key, f"{type(e).__name__}: {e}")
            return None
        self._jits[key] = jit
        return out

    def _capture(self, key: tuple, t, beam: int | None = None):
        """Capture a JIT for `key` on this call (under BEAM=beam when given), keep it and save it.
        Returns (the output, the graph file written or None)."""
        encoder = self._encoder(key)
        jit = _tinygrad.new_jit(lambda inp: _tinygrad.realize(encoder(inp).float()))   # C compiling early
        start = time.perf_counter()
        with trace.phase(f"graph {progress.graph_name(key)}: compiled and run"):
            if beam is None:
                progress.compiling(key)    # on a terminal only: the one long wait a user sees unexplained
                with _tinygrad.forked_compiles():
                    out = _tinygrad.to_numpy(jit(t))
                beam = _tinygrad.beam_setting()
            else:    # minutes: which kernel the search is at
                progress.tuning(key, beam, 0, 0, 0.0)

                def at_kernel(i: int, n: int) -> None:
                    progress.tuning(key, beam, i, n, time.perf_counter() - start)
                with _tinygrad.beam_context(beam), _tinygrad.beam_progress(at_kernel):
                    out = _tinygrad.to_numpy(jit(t))
        progress.clear()
        self._jits[key] = jit
        saved = self.graphs.save(key, jit, tuned=beam > 0, beam=beam) if self.graphs is not None else None
        if self.account is not None:
            self.account.compiled(key)
        return out, saved

    def image_features(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        """Embeddings of float32 pixel values (N, C, S, S), batch_size at a time."""
        def fill(rows: np.ndarray, start: int, stop: int) -> None:
            rows[:stop - start] = pixels[start:stop]
        return self.images(len(pixels), batch_size, fill)

    def images(self, n: int, batch_size: int, fill: Callable[[np.ndarray, int, int], None],
               scaling: PixelScaling | None = None) -> np.ndarray:
        """Embeddings (n, projection_dim) of n images, batch_size at a time, in order.

        fill(rows, start, stop) writes images start..stop-1 into rows[0:stop - start] of a staging
        array of the batch's bucket: uint8 crops (S, S, C) that the graph scales and normalises with
        `scaling`, or float32 pixel values (C, S, S) when it is None. It runs in a second thread for
        every batch after the first, while the device encodes the one before; an exception it raises
        is raised here, at its batch's turn, so the first failing image (in order) is the one reported.
        With `prefetch` False every batch is filled in this thread, after the one before has run.
        """
        if n == 0:
            return np.zeros((0, self.model.config.projection_dim), np.float32)
        chunks = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        with self.lock:     # each batch's bucket: its own, or a bigger compiled one (batch_plan.py)
            buckets = self.planner.images([stop - start for start, stop in chunks], batch_size,
                                          lambda b: self.image_key(b, scaling))
        stagings: dict[tuple[int, int], _tinygrad.Staging] = {}

        def staging(k: int) -> _tinygrad.Staging:
            # two per bucket, in turn: one is filled while the device reads the other
            b = buckets[k]
            if (b, k % 2) not in stagings:
                shape, dtype = self._input_shape(self.image_key(b, scaling))
                with self.lock, self.context():
                    stagings[b, k % 2] = _tinygrad.Staging(shape, dtype, self.backend.device)
            return stagings[b, k % 2]

        def filled(k: int, rows: _tinygrad.Staging) -> _tinygrad.Staging:
            fill(rows.array, *chunks[k])
            return rows
        out = []
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tinyclip-prefetch") as pool:
            batch = filled(0, staging(0))
            for k, (start, stop) in enumerate(chunks):
                last = k + 1 == len(chunks)
                following = pool.submit(filled, k + 1, staging(k + 1)) if self.prefetch and not last else None
                out.append(self._run(self.image_key(batch.shape[0], scaling), batch)[:stop - start])
                if not last:
                    batch = following.result() if following is not None else filled(k + 1, staging(k + 1))
        return np.concatenate(out)

    def text_features(self, ids: np.ndarray, batch_size: int) -> np.ndarray:
        needed = pooling.positions(ids, self.model.config.text_config.eos_token_id) + 1
        with self.lock:
            plan = list(self.planner.text(needed, batch_size, text_lengths(ids.shape[1])))
        out = None
        for rows, (_, b, length) in plan:
            padded = np.empty((b, length), np.int32)
            padded[:len(rows)] = ids[rows, :length]
            padded[len(rows):] = ids[rows[0], :length]   # any valid row; dropped below
            features = self._run(("text", b, length), padded)[:len(rows)]
            if out is None:
                out = np.empty((len(ids), *features.shape[1:]), features.dtype)
            out[rows] = features
        return out

    def text_length(self, ids: np.ndarray, batch: int | None = None) -> int:
        """The length a batch of (N, context) ids runs at, in the batch bucket `batch` (default: N): see
        batch_plan.Planner.text (the rents stay as they are)."""
        needed = pooling.positions(ids, self.model.config.text_config.eos_token_id) + 1
        with self.lock:
            _, key = next(self.planner.text(needed, batch or len(ids), text_lengths(ids.shape[1]), record=False))
        return key[2]

    def compiled(self, key: tuple) -> bool:
        """Whether the graph for `key` runs without compiling: captured in this process, or in the graph cache."""
        if key in self._jits:
            return True
        return self.jit and self.graphs is not None and self.graphs.has(key)

    def tune(self, key: tuple, beam: int) -> tuple[float, object]:
        """Beam-search the kernels of the graph for `key` (see image_key, or ("text", batch, length)),
        keep it for this process and store it in the graph cache marked tuned, replacing any graph
        there. Returns (seconds taken, the file written or None when the cache is off)."""
        self.ready("text" if key[0] == "text" else "image")
        shape, dtype = self._input_shape(key)
        x = np.zeros(shape, dtype)
        with self.lock, self.context():
            start = time.perf_counter()
            _, saved = self._capture(key, _tinygrad.to_tensor(x, self.backend.device), beam=beam)
            return time.perf_counter() - start, saved
