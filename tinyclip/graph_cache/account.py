"""The padding account, kept between processes next to the graph files it is about.

batch_plan.Planner lets a batch run padded in a bigger compiled graph while the padding spent in place
of its own graph (its rent) stays under what compiling that graph costs. Counted per process, a
one-image call after an `embed` job would run the batch-32 graph in every new process, forever: each
process starts with no rent. So each model's rents live in a small JSON file beside its graphs
(`account-<digest of the graph key>.json`).

Files are read only when they and their folder are yours alone (tinyclip/trust.py) and written
atomically. Two processes updating one file at once may lose one's increments: the rent then grows
a little slower, which delays a compile and never gives a wrong result.
"""
from __future__ import annotations

import json
import math
import os
import pathlib

from .. import trust
from ..atomic import write_atomic

FORMAT = 1


def name(graph: tuple) -> str:
    return "-".join(map(str, graph))


class Account:
    """Rents (runner key -> units of padding spent in its place) of one model's graphs."""

    def __init__(self, path: os.PathLike):
        self.path = pathlib.Path(path)
        self._data: dict | None = None

    # ---- reading ----------------------------------------------------------------------------------

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = _read(self.path)
        return self._data

    def rent(self, graph: tuple) -> float:
        return float(self.data["rent"].get(name(graph), 0.0))

    # ---- writing -----------------------------------------------------------------------------------

    def spend(self, rents: dict[tuple, float]) -> None:
        """Add padding spent in place of graphs (runner key -> units) and save."""
        if not rents:
            return
        self._update(lambda d: d["rent"].update({name(g): d["rent"].get(name(g), 0.0) + r for g, r in rents.items()}))

    def compiled(self, graph: tuple) -> None:
        """`graph` was compiled: its rent is paid (and the entry dropped)."""
        if name(graph) in self.data["rent"]:
            self._update(lambda d: d["rent"].pop(name(graph), None))

    def _update(self, change) -> None:
        fresh = _read(self.path)     # another process may have written since this one read
        change(fresh)
        self._data = fresh
        _write(self.path, fresh)


def _empty() -> dict:
    return {"format": FORMAT, "rent": {}}


def _read(path: pathlib.Path) -> dict:
    """The file's contents, or an empty account when it is missing, not trusted or not an account."""
    try:
        data = json.loads(trust.read_trusted(path)[:1 << 20])    # a plain file, yours alone
    except (OSError, ValueError):
        return _empty()
    out = _empty()
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return out
    values = data.get("rent")
    if isinstance(values, dict):
        out["rent"] = {str(k): float(v) for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0}
    return out


def _write(path: pathlib.Path, data: dict) -> None:
    """Best effort: an account that cannot be saved only makes the next process start from what is on disk."""
    try:
        if path.parent.is_dir():
            write_atomic(path, lambda f: f.write(json.dumps(data, sort_keys=True).encode()))
    except OSError:     # a full disk, a folder others may write (UnsafeFileError)
        pass
