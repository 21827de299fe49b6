"""Where tinyclip keeps what it caches on disk (graphs, tuning, label embeddings, file hashes), without
importing tinygrad: $TINYCLIP_CACHE_DIR, else $XDG_CACHE_HOME/tinyclip, else ~/.cache/tinyclip."""
from __future__ import annotations

import os
import pathlib

ENV_DIR = "TINYCLIP_CACHE_DIR"           # tinyclip's cache folder
ENV_DISABLE = "TINYCLIP_GRAPH_CACHE"     # "0" switches off everything tinyclip keeps on disk


def cache_root() -> pathlib.Path:
    """tinyclip's cache folder: $TINYCLIP_CACHE_DIR, else $XDG_CACHE_HOME/tinyclip, else ~/.cache/tinyclip."""
    if root := os.environ.get(ENV_DIR):
        return pathlib.Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"   # XDG: relative = unset
    return base / "tinyclip"


def enabled(option: bool = True) -> bool:
    """Whether to use the caches: `option` (load(..., graph_cache=)), unless the environment
    variable TINYCLIP_GRAPH_CACHE switches them off (0, false, no, off)."""
    return bool(option) and os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "no", "off")
