"""Which graph file serves a model: a key covering everything that shapes a compiled graph.

The key is stored in each file's header and compared on loading; its hash names the file. It holds
the architecture (config.json's fields, and each state-dict entry's name, shape and dtype, not the
values), the code that builds the graph (every tinyclip source file, recursively, the backend's
module and its kernel set's), the backend, its device and code generator (for CPUs the host CPU
and instruction set, as kernels are compiled for it, and the number of threads kernels are split
between), the kernel set's own key (its ISA and tuning), the compute dtype and whether float32 matmuls may
use TF32 tensor cores, the tinygrad and
tinyclip versions, and the graph's (tower, batch bucket, text length).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import pathlib

from tinygrad.nn.state import get_state_dict

from .. import _tinygrad, cpu_info

FORMAT = 2                               # of the file; part of the key
PACKAGE = pathlib.Path(__file__).resolve().parents[1]     # tinyclip/
# The tinygrad sources whose classes the pickle holds: a change to any of them changes the key.
TINYGRAD_SOURCES = ("uop/ops.py", "engine/jit.py", "engine/realize.py", "device.py", "dtype.py", "tensor.py")


def base_key(model, backend, tf32: bool = False, architecture: str | None = None) -> dict:
    """The parts of the key shared by all of one model's graphs on one backend (tf32: compiled for TF32
    tensor cores, Runner's setting; architecture: architecture_hash(model), when taken earlier)."""
    from .. import __version__
    dtype = model.logit_scale.dtype
    kernels = model.kernels
    with backend.context():     # the code generator is chosen by the backend's settings
        codegen = _tinygrad.codegen(backend.device)
        if backend.device.split(":")[0] == "CPU":    # tinygrad compiles CPU kernels for the host's instruction set
            codegen += f":{host_cpu()}:threads={_tinygrad.cpu_threads()}"
    return {
        "format": FORMAT,
        "architecture": architecture if architecture is not None else architecture_hash(model),
        "code": code_hash(tuple(filter(None, (source_file(type(backend)), source_file(type(kernels)))))),
        "backend": backend.name,
        "device": backend.device,
        "codegen": codegen,
        "kernels": kernels.key(),
        "dtype": "float16" if dtype.itemsize == 2 else "float32",
        "tf32": tf32,
        "tinygrad": tinygrad_version(),
        "tinyclip": __version__,
    }


def canonical(obj) -> bytes:
    """A key (or any JSON-able value) as bytes, the same for equal values."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(key: dict) -> str:
    return hashlib.sha256(canonical(key)).hexdigest()[:24]


def architecture_hash(model) -> str:
    """sha256 of the config and of each state-dict entry's name, shape and dtype (not its values)."""
    entries = sorted((name, list(t.shape), t.dtype.name) for name, t in get_state_dict(model).items())
    return hashlib.sha256(canonical({"config": dataclasses.asdict(model.config), "state_dict": entries})).hexdigest()


@functools.cache
def _file_hash(path: str) -> str:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unknown"


def source_file(obj) -> str | None:
    try:
        return inspect.getsourcefile(obj)
    except (TypeError, OSError):     # defined in __main__ of `python -c`, or in C
        return None


@functools.cache
def code_hash(extra_sources: tuple[str, ...] = ()) -> str:
    """Every tinyclip source file, in every subpackage (the model, its kernel sets, the runner), and
    `extra_sources` (a plugin backend's module, its kernel set's): the code that builds the graph."""
    files = sorted(PACKAGE.rglob("*.py")) + [pathlib.Path(p) for p in extra_sources]
    return hashlib.sha256("".join(f"{f.relative_to(PACKAGE) if f.is_relative_to(PACKAGE) else f}:"
                                  f"{_file_hash(str(f))}," for f in files).encode()).hexdigest()[:16]


@functools.cache
def tinygrad_version() -> str:
    import tinygrad
    try:
        version = importlib.metadata.version("tinygrad")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = pathlib.Path(tinygrad.__file__).parent
    sources = hashlib.sha256(b"".join(_file_hash(str(root / p)).encode() for p in TINYGRAD_SOURCES)).hexdigest()
    return f"{version}+{sources[:16]}"


@functools.cache
def host_cpu() -> str:
    """A hash of the host CPU's model and feature flags (cpu_info)."""
    return hashlib.sha256(cpu_info.description().encode()).hexdigest()[:16]
