#!/usr/bin/env python
"""This machine's float32 FMA peak, measured: the limit a matmul's GFLOPS is a share of.

    python benchmarks/fma_peak.py [--isa avx2|avx512] [--threads N]

Compiles (with clang, as tinygrad does) a loop of independent fused multiply-adds on vector registers,
as wide as the instruction set's (8 lanes for AVX2, 16 for AVX-512) and with enough accumulators to
cover the FMA latency, runs it on each of N threads at once, and prints GFLOPS (2 per FMA lane).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import threading
import time

SOURCE = r"""
typedef float vec __attribute__((ext_vector_type(LANES)));
__attribute__((min_vector_width(LANES * 32)))   /* whole vectors where clang's tuning prefers 256 bits (Intel) */
float fma_loop(long iterations, float seed) {
  vec a[ACCUMULATORS], b = seed, c = seed * 0.5f;
  for (int i = 0; i < ACCUMULATORS; i++) a[i] = seed + i;
  for (long n = 0; n < iterations; n++) {
    #pragma unroll
    for (int i = 0; i < ACCUMULATORS; i++) a[i] = a[i] * b + c;   // one FMA with -ffp-contract=fast
  }
  float total = 0;
  for (int i = 0; i < ACCUMULATORS; i++) for (int l = 0; l < LANES; l++) total += a[i][l];
  return total;
}
"""
FLAGS = {"avx2": ("-march=x86-64-v3", 8), "avx512": ("-march=native", 16)}
ACCUMULATORS = 12     # FMA latency (4-5 cycles) x 2 pipes, with room: every pipe busy every cycle


def peak_gflops(isa: str, threads: int, seconds: float = 0.5) -> float:
    march, lanes = FLAGS[isa]
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "fma.c"), os.path.join(tmp, "fma.so")
        with open(src, "w") as f:
            f.write(SOURCE.replace("LANES", str(lanes)).replace("ACCUMULATORS", str(ACCUMULATORS)))
        subprocess.run(["clang", "-O2", "-ffp-contract=fast", "-shared", "-fPIC", march, src, "-o", lib], check=True)
        fn = ctypes.CDLL(lib).fma_loop
        fn.argtypes, fn.restype = (ctypes.c_long, ctypes.c_float), ctypes.c_float
        iterations = 1000
        while True:   # size the loop to about `seconds` on one thread
            start = time.perf_counter()
            fn(iterations, 1e-3)
            if time.perf_counter() - start > seconds / 4:
                break
            iterations *= 4
        # ctypes releases the GIL while the loop runs: the threads run on as many cores
        workers = [threading.Thread(target=fn, args=(iterations, 1e-3)) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
    return threads * iterations * ACCUMULATORS * lanes * 2 / elapsed / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--isa", choices=sorted(FLAGS), default="avx2")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    print(f"{args.isa}: {peak_gflops(args.isa, args.threads):.0f} GFLOPS on {args.threads} threads, "
          f"{peak_gflops(args.isa, 1):.0f} on one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
