"""Compiling a JIT capture's kernels in forked worker processes (tinygrad/engine/realize.py, worker.py).

tinygrad 0.14 lowers and compiles the kernels of a capture in a pool of PARALLEL worker processes
(lower_and_compile, through realize.get_worker_pool). Its workers are spawned: each starts Python,
imports tinygrad and builds its rewrite rules before its first kernel, and is replaced by a new one
after 16 kernels. Code generation is most of a capture (ViT-B/32's text graph: 19 kernels, 12 s of CPU
in tinygrad's rewrites, 1.5 s in clang), and a spawned worker's start costs about 2 s of CPU on top:
one text graph took 15.0 s of CPU (13.6 s wall) in tinygrad's pool on the AVX-512 machine, against
11.4 s (10.9 s wall) in forked workers, which start as this process is, tinygrad imported and its
rules built, in milliseconds.

`forked_compiles()` makes the captures inside it use such a pool, forked at the first capture that
has kernels to compile in parallel and ended on leaving: a forked worker keeps this process's memory
as it was at the fork, which this process's later writes would otherwise copy. The workers only
generate code and run clang (tinygrad's worker set-up, worker._init_worker, forbids device use): no
lock that another thread of this process may hold at the fork is ever taken in them, except in the
libraries of UNFORKABLE (gRPC's threads in a Ray worker), whose presence means spawning as tinygrad
does. Forking is used on Linux only (macOS forbids it after system frameworks start threads). Where
PARALLEL=0, tinygrad's own choice (no pool) stands.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import sys

# Libraries whose threads must not be forked under: the child could wait forever on a lock one of them held.
UNFORKABLE = ("grpc", "ray")
pools_made = 0    # forked pools made in this process (what the tests check)


def fork_is_safe() -> bool:
    """Whether forking compile workers from this process is safe: Linux, and none of UNFORKABLE loaded.
    (numpy's OpenBLAS threads are there in every process; OpenBLAS shuts them down around a fork.)"""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not any(name in sys.modules for name in UNFORKABLE)


@contextlib.contextmanager
def forked_compiles():
    """Inside, tinygrad compiles a capture's kernels in forked workers (see the module docstring)."""
    from tinygrad.engine import realize, worker
    from tinygrad.helpers import PARALLEL
    if not fork_is_safe() or getattr(realize.get_worker_pool, "tinyclip_forked", False):
        yield
        return
    pool = None

    def forked_pool():
        global pools_made
        nonlocal pool
        if multiprocessing.current_process().daemon or PARALLEL.value <= 0:
            return None
        if pool is None:
            # worker._init_worker is looked up now: cpu_runtime replaces it to install its pass in workers
            pool = multiprocessing.get_context("fork").Pool(PARALLEL.value, worker._init_worker)
            pools_made += 1
        return pool

    forked_pool.tinyclip_forked = True
    tinygrad_pool = realize.get_worker_pool
    realize.get_worker_pool = forked_pool
    try:
        yield
    finally:
        realize.get_worker_pool = tinygrad_pool
        if pool is not None:
            pool.terminate()     # idle by now; ends the workers and their hold on this process's memory
