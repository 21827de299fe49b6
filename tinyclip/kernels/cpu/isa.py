"""Which vector instruction set the CPU kernels are shaped for, and what this CPU has.

Each instruction set is data (ISA): its float32 lanes, its vector registers, the /proc/cpuinfo flags
it needs, and the target tinygrad compiles for when the set is forced below what the CPU has. The
kernels derive their tiles from these numbers; nothing in them branches on an ISA's name.

TINYCLIP_CPU_ISA chooses: `native` (the default) takes the widest set this CPU has; `avx2` or
`avx512` force one (on a wider CPU, kernels are then also compiled without the wider instructions:
a like-for-like path). A CPU with none of them (an x86-64 without AVX2 and FMA, an arm64 until a
NEON entry is added here) runs tinygrad's default kernels: same numbers, slower.
"""
from __future__ import annotations

import dataclasses
import os
import platform

from ... import cpu_info
from ...errors import BackendError

ENV = "TINYCLIP_CPU_ISA"


@dataclasses.dataclass(frozen=True)
class ISA:
    name: str
    needs: tuple[str, ...]    # /proc/cpuinfo flags, all required
    lanes: int                # float32 values per vector register
    registers: int            # vector registers the compiler can allocate
    tile_rows: tuple[int, ...]  # candidate rows of a matmul register tile two vectors wide, whose rows x 2
                              # accumulators leave room for the operands (a spilling tile runs at half
                              # speed or worse); tuning.py times each on the machine and keeps the fastest
    arch: str                 # tinygrad's target arch (clang -march / LLVM cpu) when forced on a wider CPU
    machine: str = "x86_64"   # platform.machine() values it runs on


# Widest first: `native` takes the first whose flags the CPU has.
ISAS = (
    ISA("avx512", needs=("avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"), lanes=16, registers=32,
        tile_rows=(4, 6, 8), arch="x86_64,x86-64-v4"),
    ISA("avx2", needs=("avx2", "fma"), lanes=8, registers=16, tile_rows=(3, 4, 6), arch="x86_64,x86-64-v3"),
)
BY_NAME = {isa.name: isa for isa in ISAS}
SETTINGS = ("native", *BY_NAME)


def runnable(flags: frozenset[str] | None = None, machine: str | None = None) -> list[ISA]:
    """The instruction sets this CPU can run, widest first."""
    flags = cpu_info.flags() if flags is None else flags
    machine = (machine or platform.machine()).lower().replace("amd64", "x86_64")
    return [isa for isa in ISAS if isa.machine == machine and set(isa.needs) <= flags]


def setting() -> str:
    value = os.environ.get(ENV, "native").strip().lower() or "native"
    if value not in SETTINGS:
        raise BackendError(f"{ENV}={value!r} is not one of {', '.join(SETTINGS)}")
    return value


def choose(wanted: str | None = None, flags: frozenset[str] | None = None,
           machine: str | None = None) -> tuple[ISA | None, str]:
    """(the ISA to shape kernels for, the tinygrad target arch to compile with) for the setting
    `wanted` (default: $TINYCLIP_CPU_ISA, else native). (None, "") where this CPU has none of ISAS;
    a forced ISA this CPU cannot run is a BackendError that says which flags are missing."""
    wanted = setting() if wanted is None else wanted
    can = runnable(flags, machine)
    if wanted == "native":
        return (can[0], "") if can else (None, "")
    isa = BY_NAME.get(wanted)
    if isa is None:
        raise BackendError(f"{ENV}={wanted!r} is not one of {', '.join(SETTINGS)}")
    if isa not in can:
        have = cpu_info.flags() if flags is None else flags
        missing = [f for f in isa.needs if f not in have]
        raise BackendError(f"{ENV}={wanted} but this CPU cannot run it (missing: {', '.join(missing) or machine}); "
                           f"it runs {', '.join(i.name for i in can) or 'none of ' + ', '.join(BY_NAME)}. "
                           f"Unset {ENV} or set it to native.")
    # The widest set this CPU has compiles for the host (tinygrad's default); a narrower one for its own target,
    # so that the compiler does not use the wider instructions behind the kernels' back.
    return isa, ("" if isa is can[0] else isa.arch)
