"""What the host CPU is: its model name and feature flags, from /proc/cpuinfo (Linux), read once per process.

The CPU kernels choose their instruction set from the flags (kernels/cpu/isa.py); the kernel tuning file
(kernels/cpu/tuning.py) and the graph cache key (graph_cache/key.py) name the CPU by them, so that a cache
copied to another machine is not used there. Where /proc/cpuinfo cannot be read, every field is empty.
"""
from __future__ import annotations

import functools
import platform

FIELDS = ("model name", "flags", "Features", "CPU part", "cpu MHz")   # x86: model name, flags, clock; arm: Features, CPU part


@functools.cache
def fields() -> dict[str, str]:
    """The first core's value of each of FIELDS that /proc/cpuinfo has."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                name = name.strip()
                if sep and name in FIELDS and name not in found:
                    found[name] = value.strip()
    except OSError:
        pass
    return found


def model() -> str:
    """The CPU's model name ("" where unknown, as on most arm64 kernels)."""
    return fields().get("model name", "")


def flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, arm `Features`); empty where unreadable."""
    info = fields()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def description() -> str:
    """Everything above and the platform's machine and processor names, as one line to hash."""
    return " ".join([platform.machine(), platform.processor(), *(f"{k}: {v}" for k, v in sorted(fields().items()))])


def mhz() -> float | None:
    """The first core's clock in MHz as /proc/cpuinfo gives it (x86), or None."""
    try:
        value = float(fields().get("cpu MHz", ""))
    except ValueError:
        return None
    return value if value > 0 else None
