"""Compiling a JIT capture's kernels in forked worker processes (tinygrad/engine/realize.py, worker.py).

tinygrad 0.14 lowers and compiles the kernels of a capture in a pool of PARALLEL worker processes
(lower_and_compile, through realize.get_worker_pool). Its workers are spawned: each starts Python,
imports tinygrad and builds its rewrite rules before its first kernel, and is replaced by a new one
after 16 kernels. Code generation is most of a capture (ViT-B/32's text graph: 19 kernels, 12 s of CPU
in tinygrad's rewrites, 1.5 s in clang), and a spawned worker's start costs about 2 s of CPU on top:
compiling one text graph in tinygrad's pool took 15.6 s of CPU on the AVX-512 machine, against 13.2 s
in one process and 11.9 s in forked workers. Forked workers start as this process is, tinygrad
imported and its rules built, in milliseconds, and stay for the life of the process.

`forked_compiles()` makes the captures inside it use such a pool. The workers only generate code and
run clang (tinygrad's worker set-up, worker._init_worker, forbids device use): no lock that another
thread of this process may hold at the fork is ever taken in them, except in the libraries of
UNFORKABLE (gRPC's threads in a Ray worker), whose presence means spawning as tinygrad does. Forking
is used on Linux only (macOS forbids it after system frameworks start threads). Where PARALLEL=0,
tinygrad's own choice (no pool) stands.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import sys

_pool = None   # (pid that made it, the pool)


# Libraries whose threads must not be forked under: the child could wait forever on a lock one of them held.
UNFORKABLE = ("grpc", "ray")


def fork_is_safe() -> bool:
    """Whether forking compile workers from this process is safe: Linux, and none of UNFORKABLE loaded.
    (numpy's OpenBLAS threads are there in every process; OpenBLAS shuts them down around a fork.)"""
    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return False
    return not any(name in sys.modules for name in UNFORKABLE)


def _forked_pool():
    """The forked worker pool of this process (made on first use), or None where tinygrad would use none."""
    global _pool
    from tinygrad.engine import worker
    from tinygrad.helpers import PARALLEL
    if multiprocessing.current_process().daemon or PARALLEL.value <= 0:
        return None
    if _pool is None or _pool[0] != os.getpid():
        # worker._init_worker is looked up now: cpu_runtime replaces it to install its pass in spawned workers
        pool = multiprocessing.get_context("fork").Pool(PARALLEL.value, worker._init_worker)
        atexit.register(pool.terminate)     # idle workers: nothing to wait for at exit
        _pool = (os.getpid(), pool)
    return _pool[1]


@contextlib.contextmanager
def forked_compiles():
    """Inside, tinygrad compiles a capture's kernels in forked workers (see the module docstring)."""
    from tinygrad.engine import realize
    if not fork_is_safe() or realize.get_worker_pool is _forked_pool:
        yield
        return
    tinygrad_pool = realize.get_worker_pool
    realize.get_worker_pool = _forked_pool
    try:
        yield
    finally:
        realize.get_worker_pool = tinygrad_pool
