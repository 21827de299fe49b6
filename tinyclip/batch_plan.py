"""Which compiled graph each batch of a job runs in: pad into one that exists, or compile its own.

A graph (one TinyJit per tower, batch bucket and text length) takes seconds to compile: 10-15 s for
ViT-B/32's text or image tower on 2 cores, where encoding a 32-row batch of 12 tokens takes a quarter
of a second. A batch runs exactly in any graph at least its size: rows past the batch are padding and
are dropped, and positions past its longest text change nothing before them (the causal mask). So each
batch chooses between compiling its own graph and padding into a bigger one that is already compiled
(in this process, in the graph cache, or earlier in the same plan). The rule is ski rental: a batch
pads into the smallest such graph while the padding spent so far in place of its own graph (its rent,
counted per own graph for the life of the Runner) stays within what compiling that graph costs
(KernelSet.compile_costs: TEXT_COMPILE_TOKENS and IMAGE_COMPILE_IMAGES for tinygrad's own kernels, less for
sets whose code is quicker to make); after that its own graph is compiled. That spends at most
about twice what knowing every later batch in advance would have. With a graph cache the rents are kept
on disk (graph_cache/account.py), so they add up across processes too: one-image calls in new processes
after an `embed` job pad into its batch-32 graph only until their padding has cost a compile, then the
batch-1 graph is compiled once. (The costs are constants, not timed per run: a plan that depended on how
busy the machine was a moment ago would compile different graphs from one run to the next.)

- A text job is planned whole: its rows sorted longest first (the order is restored by the caller), so
  the first batch compiles a length that the shorter batches after it pad into.
- A job of one text (a search query) that must compile compiles the full context: about 60 ms more
  for that query on ViT-B/32, after which every later query, of any length, runs in it instead of
  compiling its own (5 queries of 5 lengths compiled 4 graphs of 10-15 s each).
- The last, partial batch of an image job pads into the full bucket that the job's first batch compiles.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

# What compiling a graph costs, as work (text tokens, images) it could have encoded instead: the kernel set's
# (KernelSet.compile_costs), these where none is given (tinygrad's own kernels: kernels/base.py).
from .kernels.base import IMAGE_COMPILE_IMAGES, TEXT_COMPILE_TOKENS


def bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, capped at `limit` (n <= limit)."""
    b = 1
    while b < n:
        b *= 2
    return min(b, max(limit, n))


def buckets_from(n: int, limit: int) -> list[int]:
    """The buckets a batch of n rows fits, smallest first: bucket(n, limit), the powers of two above it
    below `limit`, and `limit`."""
    out = [bucket(n, limit)]
    while out[-1] * 2 < limit:
        out.append(out[-1] * 2)
    return out if out[-1] >= limit else out + [limit]


class Planner:
    """Chooses graphs for the batches of one Runner's jobs, and keeps each own graph's rent.

    `compiled(key)` says whether the graph for a runner key (("image", batch[, ...]) or ("text", batch,
    length)) runs without compiling. `account` (a graph_cache.Account, or None) keeps the rents between
    processes; without one they last as long as the Planner."""

    def __init__(self, compiled: Callable[[tuple], bool], account=None, costs: tuple[float, float] | None = None):
        self.compiled = compiled
        self.account = account
        # a compile, in text tokens and in images
        self.text_cost, self.image_cost = costs if costs is not None else (TEXT_COMPILE_TOKENS, IMAGE_COMPILE_IMAGES)
        self.rent: dict[tuple, float] = {}    # own graph -> padding spent in its place so far (without an account)
        self._spent: dict[tuple, float] = {}  # padding of the plan being made, saved when it is complete

    def _rent(self, own: tuple) -> float:
        base = self.account.rent(own) if self.account is not None else self.rent.get(own, 0.0)
        return base + self._spent.get(own, 0.0)

    def _settle(self) -> None:
        """Book the padding of the plan just made: in the account (one file write), or in self.rent."""
        spent, self._spent = self._spent, {}
        if self.account is not None:
            self.account.spend(spent)
        else:
            for own, rent in spent.items():
                self.rent[own] = self.rent.get(own, 0.0) + rent

    def _pad_or_compile(self, own: tuple, own_work: float, fits: list[tuple[tuple, float]], planned: set,
                        compile_cost: float, record: bool) -> tuple | None:
        """The graph to pad into (the cheapest of `fits`, (key, work) pairs, that is compiled or planned) while
        own's rent allows; None when own must be compiled."""
        if own in planned or self.compiled(own):
            return own
        ready = [(work, key) for key, work in fits if key != own and (key in planned or self.compiled(key))]
        if not ready:
            return None
        work, key = min(ready, key=lambda wk: wk[0])
        if self._rent(own) + work - own_work > compile_cost:
            return None
        if record:
            self._spent[own] = self._spent.get(own, 0.0) + work - own_work
        return key

    def text(self, needed: np.ndarray, batch_size: int, lengths: list[int], record: bool = True
             ) -> Iterator[tuple[np.ndarray, tuple]]:
        """(rows, key) for each batch of a text job: `rows` indexes the job's texts (longest first, at most
        batch_size of them), `key` is ("text", bucket, length). `needed[i]` is the number of positions
        text i needs (its pooled position + 1); `lengths` the lengths a batch may run at, ascending, the
        last one the context. With record=False the plan leaves the rents as they were."""
        order = np.argsort(-np.asarray(needed), kind="stable")
        planned: set[tuple] = set()
        self._spent = {}
        cost = self.text_cost
        try:
            yield from self._text(order, needed, batch_size, lengths, planned, cost, record)
        finally:
            if record:
                self._settle()
            self._spent = {}

    def _text(self, order, needed, batch_size, lengths, planned, cost, record):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            n, fits = len(rows), [length for length in lengths if length >= needed[rows[0]]]
            own_b, own_len = bucket(n, batch_size), fits[0]
            own = ("text", own_b, own_len)
            options = [(("text", b, length), b * length) for b in buckets_from(n, batch_size) for length in fits]
            key = self._pad_or_compile(own, own_b * own_len, options, planned, cost, record)
            if key is None:     # compile own; a query (one text) the full context, for every later query
                full = ("text", 1, fits[-1])
                key = full if len(order) == 1 and not self.compiled(full) else own
            planned.add(key)
            yield rows, key

    def images(self, sizes: list[int], batch_size: int, key_of: Callable[[int], tuple], record: bool = True
               ) -> list[int]:
        """The bucket each batch of an image job runs in, for batches of `sizes` images in turn;
        `key_of(bucket)` is the runner key of that bucket's graph."""
        planned: set[tuple] = set()
        out = []
        self._spent = {}
        cost = self.image_cost
        for n in sizes:
            options = [(key_of(b), b) for b in buckets_from(n, batch_size)]
            own_b = options[0][1]
            key = self._pad_or_compile(key_of(own_b), own_b, options, planned, cost, record)
            key = key_of(own_b) if key is None else key
            planned.add(key)
            out.append(next(b for k, b in options if k == key))
        if record:
            self._settle()
        self._spent = {}
        return out
