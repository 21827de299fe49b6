"""What the CPU kernels are shaped by on this machine: the instruction set, the caches, the threads,
the matmul's tile and loop order, and two costs (a thread hand-off, the matmul's speed on one core).

Cache sizes come from /sys (Linux) per core; where unreadable, FALLBACK_CACHES. The tile, the loop
order and the costs are measured by tuning.py in a few seconds, once per machine, and kept next to
the graph cache.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

from .isa import ISA

FALLBACK_CACHES = (32 << 10, 1 << 20)   # L1d, L2 bytes where /sys does not say: the smallest of current x86 cores


@dataclasses.dataclass(frozen=True)
class Machine:
    isa: ISA
    l1d: int              # bytes of level-1 data cache per core
    l2: int               # bytes of level-2 cache per core
    threads: int          # threads a kernel may be split between
    tile_rows: int        # rows of the matmul's register tile (one of isa.tile_rows, the fastest here)
    rows_outer: bool      # for inputs larger than L2: row tiles outside panels (each sweeps every panel), or
                          # panels outside (each panel stays in L2 while every row streams past); the faster here
    handoff_us: float     # waking a helper thread and hearing back: below a few of these, a kernel stays on one thread
    macs_per_us: float    # the matmul kernel's multiply-adds per microsecond on one core

    def threads_for(self, macs: float, efficiency: float = 1.0) -> int:
        """Threads to split a kernel of `macs` multiply-adds between: all of them unless one core would finish
        it in under 4 hand-offs (waking helpers would cost more than it saves). `efficiency` is the kernel's
        speed against the matmul's (an elementwise kernel does one operation where the matmul does a
        multiply-add on a vector of lanes)."""
        if self.threads <= 1:
            return 1
        one_core_us = macs / (self.macs_per_us * efficiency)
        return self.threads if one_core_us >= 4 * self.handoff_us else 1

    def key(self) -> dict:
        """The parts that shape a kernel's code (the measured costs only choose thread splits, which do not
        change a result: they stay out of the graph cache key)."""
        return {"isa": self.isa.name, "lanes": self.isa.lanes, "tile_rows": self.tile_rows,
                "rows_outer": self.rows_outer, "l2": self.l2}


@functools.cache
def cache_sizes() -> tuple[int, int]:
    """(L1 data, L2) bytes of one core, from /sys/devices/system/cpu/cpu0/cache; FALLBACK_CACHES where unknown."""
    found = {}
    for index in sorted(pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _bytes((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if (level, kind) in ((1, "Data"), (2, "Unified")):
            found[level] = size
    return found.get(1, FALLBACK_CACHES[0]), found.get(2, FALLBACK_CACHES[1])


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1:].upper() in units else int(text)
