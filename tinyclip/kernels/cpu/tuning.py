"""What the CPU kernels choose on this machine: modelled at first, measured by `tinyclip tune` and kept on disk.

Until `tinyclip tune` has run on a machine, the choices below come from a model of it (modelled(): the
ISA's registers, a default loop order, the clock), so that a new machine's first answer compiles and times
nothing extra. `tinyclip tune` measures them (measure()):

- the matmul's register tile: each of the ISA's candidate tile rows (isa.tile_rows) is timed on one
  core on an input that fits in cache, and the fastest kept;
- its loop order for inputs larger than half of L2: row tiles or panels outside, timed on all the
  threads, as it runs (each thread then streams its share of the weights, or all of the input, from L3
  at the same time); rows outside must win by ORDER_MARGIN, else panels stay outside: they need a
  quarter of the bandwidth (each input float feeds a panel's 2 vectors of columns, each weight float
  a tile's few rows). On a 2-core Zen 4 the two orders ran every ViT-B/32 shape within a few percent
  of each other once the accumulators stayed in registers;
- the thread hand-off: waking tinyclip's helper threads and hearing back (tens of microseconds on a
  VM, a few on bare metal): a kernel that one core finishes in a few hand-offs stays on one thread;
- the matmul's speed on one core (multiply-adds per microsecond), from which the other kernels'
  times are estimated by ratios (norm.VALUE_COST, attention.SCORE_COST, ...).

Measuring takes a few seconds on a quiet machine (a handful of small kernels to compile, together on all
cores, and a few runs each); on a busy one the timings say more about the others' work. The result is a small JSON file in tinyclip's cache folder (next to graphs/), keyed by
the CPU's model and flags, the thread count, the instruction set and the tinyclip and tinygrad
versions; like graph files it is read only when it and its folder are yours alone, and written
atomically. Delete it to measure again.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import time

import numpy as np

from ... import cpu_info, trace, trust
from ...atomic import write_atomic
from ..._tinygrad import buffers, cpu_runtime, forked_compiles, jit
from ..._tinygrad.device import cpu_threads
from .isa import ISA
from .machine import Machine, cache_sizes

FORMAT = 3       # 3: accumulators held as vectors (cpu_runtime._coalesce_wide), loop order timed on all threads
TILE_SHAPE = (256, 768, 768)    # rows, inputs, outputs timed for the tile: 151M multiply-adds, a few ms a run
ORDER_SHAPE = (768, 1536)       # inputs, outputs timed for the loop order, on twice as many rows as fill L2
ORDER_MARGIN = 1.05             # rows outside only when this much faster than panels outside
RUNS = 5                        # timed rounds over the candidates, after the runs that compile them; the fastest counts
# The model of a machine that `tinyclip tune` has not measured (modelled): a core's matmul speed is this share of
# 2 FMA pipes x lanes x clock (Zen 4 runs AVX-512 on 256-bit halves: half; wider cores are underestimated, which only
# keeps a few more small kernels on one thread), at MODEL_MHZ where /proc/cpuinfo gives no clock.
MODEL_FMA_EFFICIENCY = 0.5
MODEL_MHZ = 2000.0


def measure(isa: ISA, device: str) -> dict:
    """The tile rows, loop order and costs for `isa` on this machine, measured now (inside the backend's
    context, outside any JIT capture): the tile and the matmul's speed on one core, the loop order on all
    the threads."""
    from . import matmul
    _, l2 = cache_sizes()
    rng = np.random.default_rng(0)

    def candidate(shape, tile_rows, rows_outer, threads=1):
        """(an input, the matmul on it, its multiply-adds) for one candidate."""
        M, K, N = shape
        machine = Machine(isa, *cache_sizes(), threads=threads, tile_rows=tile_rows, rows_outer=rows_outer,
                          handoff_us=1.0, macs_per_us=1.0)
        x = buffers.from_numpy(rng.standard_normal((M, K), dtype=np.float32), device)
        w = matmul.to_panels(buffers.from_numpy(rng.standard_normal((N, K), dtype=np.float32), device),
                             matmul.panel_width(N, isa.lanes))
        return x, lambda inp: matmul.panel_linear(inp, w, None, None, None, machine), M * N * K

    def compiled(candidates: dict) -> dict:
        """Each candidate as (a call that runs it, its multiply-adds). Their kernels are compiled together,
        in parallel (most of a compile is tinygrad's code generation, in Python: one kernel a core), then
        each is captured by a TinyJit, which finds its kernel compiled: the times are the kernel's, not
        tinygrad's scheduling."""
        outputs = [matmul_of(x) for x, matmul_of, _ in candidates.values()]
        with forked_compiles():
            outputs[0].realize(*outputs[1:])
        calls = {}
        for name, (x, matmul_of, macs) in candidates.items():
            run = jit.new_jit(lambda inp, matmul_of=matmul_of: matmul_of(inp).realize())
            run(x)   # captures
            calls[name] = ((lambda run=run, x=x: run(x)), macs)
        return calls

    def fastest(candidates: dict) -> tuple[object, dict]:
        """Time the candidates in turn, RUNS rounds (so that a busy moment slows all of them alike), and
        return the fastest and each one's speed in multiply-adds per microsecond."""
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(RUNS):
            for name, (call, _) in candidates.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
        speeds = {name: candidates[name][1] / (best[name] * 1e6) for name in candidates}
        return max(speeds, key=speeds.get), speeds

    tile_rows, tiles = fastest(compiled({rows: candidate(TILE_SHAPE, rows, False) for rows in isa.tile_rows}))
    K, N = ORDER_SHAPE
    big = (2 * l2 // (K * 4) // tile_rows + 1) * tile_rows, K, N
    _, orders = fastest(compiled({outer: candidate(big, tile_rows, outer, cpu_threads()) for outer in (False, True)}))
    rows_outer = orders[True] > ORDER_MARGIN * orders[False]
    handoffs = [cpu_runtime.handoff_seconds() for _ in range(50)]
    return {"tile_rows": tile_rows, "rows_outer": rows_outer,
            "handoff_us": statistics.median(handoffs) * 1e6, "macs_per_us": tiles[tile_rows],
            "measured": {"tiles": tiles, "orders": {str(k): v for k, v in orders.items()}}}


def machine(isa: ISA, device: str, folder) -> Machine:
    """This machine's Machine for `isa`: its caches and threads, and the costs from the file in `folder`
    where `tinyclip tune` measured them (and the file can be trusted), else the costs of a model of the
    machine (modelled): nothing is compiled or timed on the way to a first answer."""
    threads = cpu_threads()
    costs = _read(folder, isa, threads) if folder is not None else None
    if costs is None:
        costs = modelled(isa)
    return _machine(isa, threads, costs)


def tune(isa: ISA, device: str, folder) -> Machine:
    """Measure the costs on this machine now (inside the backend's context), keep them in `folder` for
    every later process, and return the Machine they give (`tinyclip tune`)."""
    threads = cpu_threads()
    cpu_runtime.install()
    with trace.phase(f"CPU kernel tiles measured ({isa.name})"):
        costs = measure(isa, device)
    if folder is not None:
        _write(folder, isa, threads, costs)
    return _machine(isa, threads, costs)


def _machine(isa: ISA, threads: int, costs: dict) -> Machine:
    return Machine(isa, *cache_sizes(), threads=threads, tile_rows=costs["tile_rows"],
                   rows_outer=costs["rows_outer"], handoff_us=costs["handoff_us"], macs_per_us=costs["macs_per_us"])


def modelled(isa: ISA) -> dict:
    """The costs from a model of the machine, with no kernel compiled (a new machine's first answer does
    not wait for the measuring, which took 2.4 s on a quiet 2-core Zen 4 and, on a shared machine, gave a
    tile chosen by whoever else was running):
    - the tile: the most rows whose accumulators (rows x 2 vectors), the 2 weight vectors of a step and
      the broadcast input fit in the ISA's vector registers (AVX-512: 8 rows of 32; AVX2: 6 of 16), so
      nothing spills; these are the tiles measured fastest on the 2-core Zen 4 for both ISAs;
    - the loop order: panels outside (a quarter of the bandwidth of rows outside; the two measured within a
      few percent at every ViT-B/32 shape there);
    - the matmul's speed on one core: MODEL_FMA_EFFICIENCY of 2 FMA pipes x the ISA's lanes at the clock
      /proc/cpuinfo gives (or MODEL_MHZ); it only decides which small kernels stay on one thread;
    - the thread hand-off: timed (50 round trips through a helper thread, a few milliseconds, no compile).
    """
    cpu_runtime.install()
    rows = max((r for r in isa.tile_rows if 2 * r + 3 <= isa.registers), default=min(isa.tile_rows))
    handoffs = [cpu_runtime.handoff_seconds() for _ in range(50)]
    return {"tile_rows": rows, "rows_outer": False, "handoff_us": statistics.median(handoffs) * 1e6,
            "macs_per_us": MODEL_FMA_EFFICIENCY * 2 * isa.lanes * (cpu_info.mhz() or MODEL_MHZ)}


def _key(isa: ISA, threads: int) -> dict:
    from ... import __version__
    return {"format": FORMAT, "cpu": cpu_info.model(), "flags": sorted(cpu_info.flags()), "threads": threads, "isa": isa.name,
            "tinyclip": __version__, "tinygrad": cpu_runtime.tinygrad_version()}


def _path(folder, isa: ISA, threads: int):
    import pathlib
    key = _key(isa, threads)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return pathlib.Path(folder) / f"{isa.name}-{digest}.json", key


def _read(folder, isa: ISA, threads: int) -> dict | None:
    path, key = _path(folder, isa, threads)
    try:
        data = json.loads(trust.read_trusted(path))
    except (OSError, ValueError):      # none, not ours alone (UnsafeFileError), not a plain file, damaged
        return None
    costs = data.get("costs") if isinstance(data, dict) and data.get("key") == key else None
    if not (isinstance(costs, dict) and all(isinstance(costs.get(k), (int, float)) and costs[k] > 0
                                            for k in ("handoff_us", "macs_per_us"))
            and costs.get("tile_rows") in isa.tile_rows and isinstance(costs.get("rows_outer"), bool)):
        return None
    return costs


def _write(folder, isa: ISA, threads: int, costs: dict) -> None:
    """Best effort: a cache that cannot be written only means measuring again next time."""
    path, key = _path(folder, isa, threads)
    try:
        for d in (path.parent.parent, path.parent):
            d.mkdir(mode=0o700, exist_ok=True)
        record = {"key": key, "costs": costs, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_atomic(path, lambda f: f.write(json.dumps(record).encode()))
    except OSError:     # a full disk, a folder others may write (UnsafeFileError): no file, no temp file
        pass
