"""Compiled encoder graphs kept on disk, so that a new process skips tinygrad's scheduling and
code generation: for ViT-B/32 on a CPU, the first image embedding takes ~1 s instead of ~7 s
after the model has loaded.

tinyclip.runner captures one TinyJit per (tower, batch bucket, text length). This package saves a
captured JIT to a file and loads it back in a later process, which then runs it without capturing
again. `tinyclip tune` stores beam-searched graphs here too; their files are marked tuned, and an
ordinary run never replaces a tuned graph with an untuned one.

- key.py    which file serves a model: everything that shapes a compiled graph, hashed
- store.py  the files: where (cache_dir), written atomically, read after trust checks, pruned
- the pickling itself touches tinygrad internals and lives in tinyclip._tinygrad.graph_pickle

Where: $TINYCLIP_CACHE_DIR/graphs, else $XDG_CACHE_HOME/tinyclip/graphs, else
~/.cache/tinyclip/graphs (folders made with mode 0700, files 0600, written atomically). A graph
not used for 30 days is deleted the next time another is saved; deleting the folder is always
safe. TINYCLIP_GRAPH_CACHE=0, or tinyclip.load(..., graph_cache=False), switches the cache off.

What a file holds: the captured graph (the compiled programs, the order to run them in, the
scratch buffers' sizes), without the model's weights: each weight buffer is written as a reference
to its state-dict name and, on loading, bound to the weights of the model loaded now. A file is a
few hundred kB whatever the checkpoint's size (ViT-B/32: 0.3-0.5 MB per graph against 605 MB of
weights), and one file serves every checkpoint of the same architecture.

Trust: pickle runs code, and the compiled programs in a file run as they are, so a file is read
only when it and its folder belong to the current user and neither is writable by group or
others; otherwise tinyclip warns, says why and what to do, compiles afresh and leaves the file
alone. A damaged file (its checksum or header does not match, it does not unpickle, or the graph
refuses the inputs) gives a warning and is replaced by a fresh capture: never a crash, never
wrong numbers.
"""
from __future__ import annotations

from ..cachedir import ENV_DISABLE, enabled
from .key import architecture_hash
from .store import ENV_DIR, MAGIC, UNUSED_DAYS, GraphCacheWarning, GraphStore, cache_dir, cache_root, read_graph_header

__all__ = ["ENV_DIR", "ENV_DISABLE", "MAGIC", "UNUSED_DAYS", "GraphCacheWarning", "GraphStore", "architecture_hash",
           "cache_dir", "cache_root", "enabled", "read_graph_header"]
