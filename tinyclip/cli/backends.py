"""`tinyclip backends`: every registered backend, whether it runs here, and why not.

    tinyclip backends          # a table; the default choice is marked with *
    tinyclip backends --json   # the same as a JSON list, for scripts

The exit code is 1 when no backend is available here (the listing says why each is not), else 0.
"""
from __future__ import annotations

import argparse

from .terminal import json_text, say

# DEVICE shows the compiler where backends share a device (CPU:CLANG, CPU:LLVM), so they look different.
COLUMNS = (("name", "NAME"), ("shown_device", "DEVICE"), ("available", "AVAILABLE"), ("default_dtype", "DEFAULT DTYPE"),
           ("dtypes", "DTYPES"), ("description", "DESCRIPTION"))


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "backends", help="list the backends, whether each runs here, and why not",
        description="List every backend registered under the entry-point group tinyclip.backends: its "
                    "tinygrad device, whether it runs on this machine (each is probed with a test kernel) or "
                    "why not, and its dtypes (checked by running where the backend is available, as declared "
                    "elsewhere).")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")
    p.set_defaults(run=run)


def describe(b, default) -> dict:
    """One backend as plain data: what --json prints for it."""
    from .. import registry
    return {"name": b.name, "device": b.device, "shown_device": registry.shown_device(b), "aliases": list(b.aliases),
            "available": b.available, "reason": b.unavailable, "default": b is default,
            "default_dtype": b.default_dtype,
            "dtypes": list(b.usable_dtypes if b.available else b.dtypes), "description": b.description,
            "kernels": _kernels(b)}


def _kernels(b) -> str | None:
    """What computes the model's hot operations on `b` (its kernel set), where `b` runs; the reason it
    would refuse (TINYCLIP_CPU_ISA naming a set this CPU lacks) shows as the backend's 'why not'."""
    if not b.available:
        return None
    try:
        return b.kernel_set().describe()
    except Exception as e:   # a plugin's kernel set failing to describe itself must not break the listing
        return f"unknown ({type(e).__name__}: {e})"


def table(rows: list[dict]) -> str:
    """Aligned columns, the default backend marked with *, and under each unavailable backend the reason."""
    cells = [[h for _, h in COLUMNS]] + [
        [r["name"], r["shown_device"], "yes" if r["available"] else "no", r["default_dtype"], ", ".join(r["dtypes"]),
         r["description"]] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]

    def line(mark, c):
        return f"{mark} " + "  ".join(f"{v:<{w}}" for v, w in zip(c, widths)).rstrip()

    lines = [line(" ", cells[0])]
    for r, c in zip(rows, cells[1:]):
        lines.append(line("*" if r["default"] else " ", c))
        if not r["available"]:
            lines.append(" " * (4 + widths[0]) + f"why not: {r['reason']}")
        elif r["kernels"]:
            lines.append(" " * (4 + widths[0]) + f"kernels: {r['kernels']}")
    default = next((r["name"] for r in rows if r["default"]), None)
    lines.append(f"\n* the default (device=None): {default}" if default else "\nno backend is available here")
    lines.append("device= and --device also take 'gpu' (the best available accelerator) or a tinygrad device "
                 "string (CPU, CPU:LLVM, CL:1, CUDA).")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .. import registry
    default = registry.default()
    rows = [describe(b, default) for b in registry.registered()]
    say(json_text(rows) if args.json else table(rows))
    return 0 if default is not None else 1     # a script can tell that nothing runs here
