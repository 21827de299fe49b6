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

import contextlib
import threading
import time

import numpy as np

from . import _tinygrad, graph_cache, pooling, progress
from .batch_plan import Planner, bucket  # noqa: F401 (bucket: the runner's rule)

# Lengths a text batch runs at (and the context length): steps of 2 positions up to 20, where prompts
# like "a photo of a {label}." (8-10 tokens) live and a step is a large share of the work, then 4 up
# to 40 and 8 beyond; 19 lengths (each a graph to compile once) for a context of 77, as a step of 4
# would give, but never more than about 1/6 of the work spent on padding.
TEXT_LENGTHS = (*range(4, 20, 2), *range(20, 40, 4), *range(40, 512, 8))


def text_lengths(context: int) -> list[int]:
    """The lengths a text batch runs at: TEXT_LENGTHS below the context length, and it."""
    return [n for n in TEXT_LENGTHS if n < context] + [context]


class Runner:
    """Encodes numpy batches with a model; one per loaded CLIP, guarded by a lock
    because tinygrad's scheduler and JIT are not thread-safe.

    jit=False runs every call plain (no TinyJit, no graph cache). cache=False, or the
    environment variable TINYCLIP_GRAPH_CACHE=0, keeps compiled graphs in memory only.
    tf32=True compiles float32 matmuls for TF32 tensor cores (a backend whose `tf32` is True).
    """

    def __init__(self, model, backend, jit: bool = True, cache: bool = True, tf32: bool = False):
        self.model, self.backend, self.jit, self.tf32 = model, backend, jit, tf32
        self.graphs = graph_cache.GraphStore(model, backend, tf32=tf32) if jit and graph_cache.enabled(cache) else None
        self._jits: dict[tuple, object] = {}
        self.planner = Planner(self.compiled)
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def context(self):
        """The backend's settings and this model's precision, under which every computation of it runs."""
        with self.backend.context(), _tinygrad.tf32_context(self.tf32):
            yield

    def _encoder(self, key: tuple):
        return self.model.get_image_features if key[0] == "image" else self.model.get_text_features

    def _run(self, key: tuple, x: np.ndarray) -> np.ndarray:
        with self.lock, self.context():
            t = _tinygrad.to_tensor(x, self.backend.device)
            if not self.jit:
                return _tinygrad.as_float32(self._encoder(key)(t))
            if (jit := self._jits.get(key)) is not None:
                return _tinygrad.to_numpy(jit(t))
            if (out := self._run_cached(key, t)) is not None:
                return out
            return self._capture(key, t)[0]

    def _run_cached(self, key: tuple, t) -> np.ndarray | None:
        """The output of the graph cached on disk for `key`, or None when there is none that runs."""
        if self.graphs is None or (jit := self.graphs.load(key)) is None:
            return None
        try:
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
        jit = _tinygrad.new_jit(lambda inp: encoder(inp).float().realize())
        progress.compiling(key)    # on a terminal only: the one long wait a user sees unexplained
        if beam is None:
            with _tinygrad.forked_compiles():
                out = _tinygrad.to_numpy(jit(t))
            beam = _tinygrad.beam_setting()
        else:
            with _tinygrad.beam_context(beam):
                out = _tinygrad.to_numpy(jit(t))
        progress.clear()
        self._jits[key] = jit
        saved = self.graphs.save(key, jit, tuned=beam > 0, beam=beam) if self.graphs is not None else None
        return out, saved

    def image_features(self, pixels: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        starts = range(0, len(pixels), batch_size)
        with self.lock:
            buckets = self.planner.images([min(batch_size, len(pixels) - i) for i in starts], batch_size,
                                          lambda b: ("image", b))
        for i, b in zip(starts, buckets):
            chunk = pixels[i:i + batch_size]
            padded = np.zeros((b, *chunk.shape[1:]), np.float32)
            padded[:len(chunk)] = chunk
            out.append(self._run(("image", b), padded)[:len(chunk)])
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
        """Beam-search the kernels of the graph for `key` (("image", batch) or ("text", batch, length)),
        keep it for this process and store it in the graph cache marked tuned, replacing any graph
        there. Returns (seconds taken, the file written or None when the cache is off)."""
        if key[0] == "image":
            v = self.model.config.vision_config
            x = np.zeros((key[1], v.num_channels, v.image_size, v.image_size), np.float32)
        else:
            x = np.zeros((key[1], key[2]), np.int32)
        with self.lock, self.context():
            start = time.perf_counter()
            _, saved = self._capture(key, _tinygrad.to_tensor(x, self.backend.device), beam=beam)
            return time.perf_counter() - start, saved
