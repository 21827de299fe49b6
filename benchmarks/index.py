"""Build and query times of tinyclip.index (flat and IVF-Flat) on random 512-d unit vectors.

    python benchmarks/index.py                    # 10^5 rows
    python benchmarks/index.py --rows 100000 1000000

Two kinds of data: "uniform" (random directions: no structure, the worst case for any index) and
"clustered" (rows around 1,000 random centres, as image embeddings cluster). For each: the time to
build the exact (flat) index and the IVF-Flat one (training, adding, calibrating nprobe), the median
time of one query (k = 10) on each, and the IVF index's recall@10 against the flat one on 200 queries
it never saw. Not a test: the times depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from tinyclip import index  # noqa: E402

DIM, QUERIES, K = 512, 200, 10


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def data(kind: str, n: int, rng):
    if kind == "uniform":
        return (unit(rng.standard_normal((n, DIM), dtype=np.float32)),
                unit(rng.standard_normal((QUERIES, DIM), dtype=np.float32)))
    centres = unit(rng.standard_normal((1000, DIM), dtype=np.float32))
    def around(m):
        return unit(centres[rng.integers(0, len(centres), m)] + 0.05 * rng.standard_normal((m, DIM), dtype=np.float32))
    return around(n), around(QUERIES)


def median_query_ms(built, queries) -> float:
    times = []
    for q in queries[:50 if built.ntotal < 10**6 else 20]:
        start = time.perf_counter()
        built.search(q[None], K)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000])
    p.add_argument("--kinds", nargs="+", default=["uniform", "clustered"])
    args = p.parse_args()
    f = index.faiss()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, faiss {f.__version__}, "
          f"{f.omp_get_max_threads()} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>9} {'data':>9} | {'flat build':>10} {'flat query':>10} | {'ivf build':>9} {'nlist':>6} "
          f"{'nprobe':>6} {'ivf query':>9} {'recall@10':>9}")
    rng = np.random.default_rng(0)
    for n in args.rows:
        for kind in args.kinds:
            x, queries = data(kind, n, rng)
            start = time.perf_counter()
            flat, _ = index.build(x, exact=True)
            flat_build = time.perf_counter() - start
            flat_ms = median_query_ms(flat, queries)
            _, truth = flat.search(queries, K)
            start = time.perf_counter()
            ivf, info = index.build(x, exact=False)
            ivf_build = time.perf_counter() - start
            ivf_ms = median_query_ms(ivf, queries)
            _, found = ivf.search(queries, K)
            recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)])
            params = info["params"]
            print(f"{n:>9,} {kind:>9} | {flat_build:>9.1f}s {flat_ms:>8.1f}ms | {ivf_build:>8.1f}s "
                  f"{params['nlist']:>6} {params['nprobe']:>6} {ivf_ms:>7.1f}ms {recall:>9.3f}", flush=True)
            del x, flat, ivf


if __name__ == "__main__":
    main()
