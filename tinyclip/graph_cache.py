"""Compiled encoder graphs kept on disk, so that a new process skips tinygrad's scheduling and
code generation: for ViT-B/32 on a CPU, the first image embedding takes ~1 s instead of ~7 s
after the model has loaded.

tinyclip.runner captures one TinyJit per (tower, batch bucket, text length). This module saves a
captured JIT to a file and loads it back in a later process, which then runs it without
capturing again. `tinyclip tune` (tinyclip/cli/tune.py) stores beam-searched graphs here too;
their files are marked tuned, and an ordinary run never replaces a tuned graph with an untuned one.

Where: $TINYCLIP_CACHE_DIR/graphs, else $XDG_CACHE_HOME/tinyclip/graphs, else
~/.cache/tinyclip/graphs (folders made with mode 0700, files 0600, written atomically). A graph
not used for 30 days is deleted the next time another is saved; deleting the folder is always
safe. TINYCLIP_GRAPH_CACHE=0, or tinyclip.load(..., graph_cache=False), switches the cache off.

What a file holds: a JSON header line (the key, tuned or not, the payload's size and sha256),
then the captured graph (tinygrad's CapturedJit: the compiled programs, the order to run them in,
the scratch buffers' sizes), pickled. The model's weights are not in it: each weight buffer is
written as a reference to its state-dict name and, on loading, bound to the weights of the model
loaded now. A file is a few hundred kB whatever the checkpoint's size (ViT-B/32: 0.3-0.5 MB per
graph against 605 MB of weights), and one file serves every checkpoint of the same architecture.

Which file: a hash of everything that shapes the graph, stored in the header too and compared on
loading: the architecture (config.json's fields, and each state-dict entry's name, shape and
dtype, not the values), tinyclip's source files and the backend's, the backend, its device, code
generator and device model (for CPUs the host CPU, as tinygrad compiles for the host's
instruction set, and the number of threads kernels are split between), the compute dtype, the
tinygrad and tinyclip versions, and the graph's (tower, batch bucket, text length).

Trust: pickle runs code, and the compiled programs in a file run as they are, so a file is read
only when it and its folder belong to the current user and neither is writable by group or
others; otherwise tinyclip warns, says why and what to do, compiles afresh and leaves the file
alone. A damaged file (its checksum or header does not match, it does not unpickle, or the graph
refuses the inputs) gives a warning and is replaced by a fresh capture: never a crash, never
wrong numbers.

tinygrad internals this module relies on (tinygrad 0.14):
  - tinygrad.engine.jit.CapturedJit: a dataclass (ret, _linear, expected_names, expected_input_info)
    that pickles through its own __reduce__; _TinyJit(None, captured) runs it (tinyclip._tinygrad).
  - CapturedJit._written_uops: a cached_property, the BUFFER UOps the graph writes (its scratch and
    output buffers). Stored with the graph and set on loading, as computing it costs ~0.3 s.
  - tinygrad.uop.ops: a BUFFER UOp's arg is a ParamArg whose `slot` is a per-process counter
    (UOp.unique_num), UOps are interned by (op, dtype, src, arg, tag), and the global `buffers`
    maps a BUFFER UOp to its device Buffer. UOp.__reduce__ would pickle a realized Buffer's bytes;
    the pickler below intercepts every device BUFFER UOp first (pickle's persistent_id).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import io
import json
import os
import pathlib
import pickle
import platform
import sys
import tempfile
import time
import warnings

from tinygrad.device import Buffer
from tinygrad.engine.jit import CapturedJit
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops, UOp, buffers

from . import _tinygrad

ENV_DISABLE = "TINYCLIP_GRAPH_CACHE"     # "0" switches the graph cache off
ENV_DIR = "TINYCLIP_CACHE_DIR"           # tinyclip's cache folder; graphs go in its graphs/
FORMAT = 1                               # of the file; part of the key
MAGIC = b"tinyclip-graph\n"
UNUSED_DAYS = 30                         # a graph not loaded for this long is deleted when another is saved
# The tinygrad sources whose classes the pickle holds: a change to any of them changes the key.
TINYGRAD_SOURCES = ("uop/ops.py", "engine/jit.py", "engine/realize.py", "device.py", "dtype.py", "tensor.py")


class GraphCacheWarning(UserWarning):
    """A cached graph could not be used or saved; tinyclip compiles afresh and goes on."""


def enabled(option: bool = True) -> bool:
    """Whether to use the graph cache: `option` (load(..., graph_cache=)), unless the environment
    variable TINYCLIP_GRAPH_CACHE switches it off (0, false, no, off)."""
    return bool(option) and os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> pathlib.Path:
    """The folder for graph files (see the module docstring)."""
    if root := os.environ.get(ENV_DIR):
        return pathlib.Path(root).expanduser() / "graphs"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"   # XDG: relative = unset
    return base / "tinyclip" / "graphs"


class GraphStore:
    """The graph files of one loaded model on one backend.

    `graph` arguments are the runner's keys: ("image", batch) or ("text", batch, length).
    """

    def __init__(self, model, backend, folder: os.PathLike | None = None):
        self.model, self.backend = model, backend
        self.folder = pathlib.Path(folder) if folder is not None else cache_dir()
        self._warned: set[tuple[str, str]] = set()

    # ---- keys ------------------------------------------------------------------------------------

    @functools.cached_property
    def _base_key(self) -> dict:
        """The parts of the key shared by all of this model's graphs."""
        from . import __version__
        dtype = self.model.logit_scale.dtype
        with self.backend.context():     # the code generator is chosen by the backend's settings
            codegen = _codegen(self.backend.device)
        return {
            "format": FORMAT,
            "architecture": architecture_hash(self.model),
            "code": _code_hash(_source_file(type(self.backend))),
            "backend": self.backend.name,
            "device": self.backend.device,
            "codegen": codegen,
            "dtype": "float16" if dtype.itemsize == 2 else "float32",
            "tinygrad": _tinygrad_version(),
            "tinyclip": __version__,
        }

    def key(self, graph: tuple) -> dict:
        return {**self._base_key, "graph": list(graph)}

    def path(self, graph: tuple) -> pathlib.Path:
        key = self.key(graph)
        digest = hashlib.sha256(_canonical(key)).hexdigest()[:24]
        return self.folder / f"{'-'.join(map(str, graph))}-{digest}.graph"

    # ---- load --------------------------------------------------------------------------------------

    def load(self, graph: tuple):
        """A TinyJit that runs the cached graph for `graph`, or None (no file, or one that cannot be
        used: the reason is warned)."""
        try:
            path = self.path(graph)
        except Exception as e:    # a model or backend the key cannot describe: no cache, no crash
            self._warn(self.folder, f"no graph cache for this model ({type(e).__name__}: {e})")
            return None
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        except OSError as e:
            self._warn(path, f"cannot read the cached graph {path} ({e.strerror or e}); compiling afresh")
            return None
        with f:
            why = _tinygrad.untrusted(path.parent) or _tinygrad.untrusted_stat(os.fstat(f.fileno()), path)
            if why:
                self._warn(path, f"not using the cached graph {path}: {why}. tinyclip reads these files with "
                           "pickle, so it uses only files that you own and that only you can write. Fix the "
                           f"permissions (chmod go-w {path.parent} {path}) or delete the file; compiling afresh "
                           "for now, and leaving the file as it is.")
                return None
            data = f.read()
        try:
            header, captured = _decode(data, self.key(graph), self.model)
        except Exception as e:   # whatever is wrong with the file, recompute: never crash, never use it
            self.discard(graph, f"{type(e).__name__}: {e}")
            return None
        jit = _tinygrad.jit_from_captured(captured)
        jit.graph_header = header
        try:
            os.utime(path)      # its modification time says when it was last used: see _prune
        except OSError:
            pass
        return jit

    def discard(self, graph: tuple, reason: str) -> None:
        """Warn that the cached graph cannot be used, and delete it so that a fresh capture replaces it."""
        path = self.path(graph)
        reason = (reason.strip().splitlines() or ["?"])[0][:300]
        self._warn(path, f"the cached graph {path} cannot be used ({reason}); deleting it and compiling afresh")
        if not _tinygrad.untrusted(path.parent) and not _tinygrad.untrusted(path):
            try:
                path.unlink()
            except OSError:
                pass

    # ---- save --------------------------------------------------------------------------------------

    def save(self, graph: tuple, jit, *, tuned: bool = False, beam: int = 0) -> pathlib.Path | None:
        """Write `jit`'s captured graph for `graph`; returns the file, or None when not saved (warned,
        except when a tuned graph is already there and this one is not tuned)."""
        captured = _tinygrad.captured_graph(jit)
        if captured is None:
            return None
        path, tmp = self.folder, None
        try:
            path = self.path(graph)
            if not self._make_folder(path):
                return None
            if path.exists():
                if why := _tinygrad.untrusted(path):
                    self._warn(path, f"not saving the compiled graph to {path}: {why}; delete the file to let "
                               "tinyclip write its own")
                    return None
                if not tuned and (read_graph_header(path) or {}).get("tuned"):
                    return None     # a tuned graph stays until `tinyclip tune` replaces it
            payload = _dumps(captured, self.model)
            header = {"key": self.key(graph), "tuned": bool(tuned), "beam": int(beam),
                      "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:     # mkstemp makes it 0600
                f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
                f.write(payload)
            os.replace(tmp, path)
            tmp = None
            self._prune(path.parent)
            return path
        except Exception as e:   # a cache that cannot be written must not stop the embedding
            self._warn(path, f"could not save the compiled graph to {path} ({type(e).__name__}: {e}); "
                       "the next process will compile it again")
            return None
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _prune(self, folder: pathlib.Path) -> None:
        """Delete graphs unused for UNUSED_DAYS (those of older tinyclip or tinygrad versions, of
        models no longer used), and temporary files a killed process left."""
        now = time.time()
        for f in folder.iterdir():
            try:
                age = now - f.lstat().st_mtime
                if (f.suffix == ".graph" and age > UNUSED_DAYS * 86400) or (f.suffix == ".tmp" and age > 86400):
                    if not _tinygrad.untrusted(f):
                        f.unlink()
            except OSError:
                pass

    def _make_folder(self, path: pathlib.Path) -> bool:
        folder = path.parent
        if not folder.is_dir():
            # tinyclip's own folders are private; a parent that exists (~/.cache) is left as it is
            for d in (folder.parent, folder):
                if not d.is_dir():
                    d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if why := _tinygrad.untrusted(folder):
            self._warn(folder, f"not saving compiled graphs in {folder}: {why}. Make it private "
                       f"(chmod 700 {folder}), or set {ENV_DIR} to a folder only you can write.")
            return False
        return True

    def _warn(self, path, message: str) -> None:
        if (str(path), message) not in self._warned:       # once per file and reason per process
            self._warned.add((str(path), message))
            warnings.warn(f"tinyclip: {message}", GraphCacheWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside tinyclip, so that a warning names the user's line."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(2), 2      # 1 is warnings.warn's caller (_warn)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def read_graph_header(path: os.PathLike) -> dict | None:
    """The JSON header of a graph file (key, tuned, beam, payload size and checksum), or None when the
    file is missing or not a graph file. Reads only the header: no pickle."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            return json.loads(f.readline(1 << 20))
    except (OSError, ValueError):
        return None


def architecture_hash(model) -> str:
    """sha256 of the config and of each state-dict entry's name, shape and dtype (not its values)."""
    entries = sorted((name, list(t.shape), t.dtype.name) for name, t in get_state_dict(model).items())
    return hashlib.sha256(_canonical({"config": dataclasses.asdict(model.config), "state_dict": entries})).hexdigest()


# ---- the file format --------------------------------------------------------------------------------

def _decode(data: bytes, key: dict, model):
    if not data.startswith(MAGIC):
        raise ValueError("not a tinyclip graph file")
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        raise ValueError("truncated header")
    header = json.loads(data[len(MAGIC):end])
    payload = data[end + 1:]
    if len(payload) != header["payload_bytes"] or hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise ValueError(f"the file is damaged or truncated ({len(payload)} of {header['payload_bytes']} bytes, "
                         "checksum mismatch)")
    if _canonical(header["key"]) != _canonical(key):
        raise ValueError("it was made for another model, device or tinygrad version")
    loaded = _Unpickler(io.BytesIO(payload), model).load()
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], CapturedJit)):
        raise TypeError(f"it holds a {type(loaded).__name__}, not a captured graph")
    captured, written = loaded
    if isinstance(vars(CapturedJit).get("_written_uops"), functools.cached_property):
        captured.__dict__["_written_uops"] = set(written)    # else its first run works it out again (~0.3 s)
    return header, captured


def _dumps(captured, model) -> bytes:
    """(the CapturedJit, the buffers its graph writes), pickled by _Pickler."""
    f = io.BytesIO()
    written = captured._written_uops
    _Pickler(f, model, written).dump((captured, list(written)))
    return f.getvalue()


def _device_buffer(u) -> bool:
    return type(u) is UOp and u.op is Ops.BUFFER and u.arg.device is not None


def _weights(model) -> dict:
    """state-dict name -> the BUFFER UOp that holds the weight now."""
    return {name: t.uop.base for name, t in get_state_dict(model).items() if _device_buffer(t.uop.base)}


class _Pickler(pickle.Pickler):
    """Pickles a CapturedJit, writing each device BUFFER UOp as a persistent id:
    ("weight", name, size, dtype, device) for the model's weights: bound to the loaded model's on loading;
    ("buffer", n, dtype, src, arg, tag, size, buffer dtype, contents) for any other buffer, the first time
    it is met, and ("buffer", n) after. Contents are stored only for a buffer that the graph reads without
    writing (a constant); the graph's scratch and output buffers are stored by size alone."""

    def __init__(self, file, model, written):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.weights = {u: name for name, u in reversed(_weights(model).items())}   # the first name of a tied weight
        self.written, self.local = written, {}

    def persistent_id(self, obj):
        if isinstance(obj, Buffer):
            raise pickle.PicklingError("a device Buffer outside a BUFFER UOp; refusing to copy its contents")
        if not _device_buffer(obj):
            return None
        if (name := self.weights.get(obj)) is not None:
            buf = obj.buffer
            return ("weight", name, buf.size, buf.dtype, buf.device)
        if (n := self.local.get(obj)) is not None:
            return ("buffer", n)
        self.local[obj] = n = len(self.local)
        buf = buffers.get(obj)
        if buf is None:
            return ("buffer", n, obj.dtype, obj.src, obj.arg, obj.tag, None, None, None)
        if not isinstance(buf, Buffer):
            raise pickle.PicklingError(f"multi-device buffers are not supported ({buf})")
        data = None if obj in self.written or not buf.is_allocated() else bytes(buf.as_memoryview())
        return ("buffer", n, obj.dtype, obj.src, obj.arg, obj.tag, buf.size, buf.dtype, data)


class _Unpickler(pickle.Unpickler):
    """Reads what _Pickler wrote: weights become the current model's weight UOps (checked for size,
    dtype and device); other buffers become new BUFFER UOps with slots from this process's counter,
    so that they can never alias a live buffer that happens to have the capturing process's slot."""

    def __init__(self, file, model):
        super().__init__(file)
        self.weights, self.local = _weights(model), {}

    def persistent_load(self, pid):
        if pid[0] == "weight":
            _, name, size, dtype, device = pid
            u = self.weights.get(name)
            if u is None:
                raise pickle.UnpicklingError(f"the graph uses weight {name}, which this model does not have")
            buf = u.buffer
            if (buf.size, buf.dtype, buf.device) != (size, dtype, device):
                raise pickle.UnpicklingError(f"weight {name} is {buf.size} x {buf.dtype} on {buf.device} here, "
                                             f"{size} x {dtype} on {device} in the graph")
            return u
        if pid[0] == "buffer" and len(pid) == 2:
            return self.local[pid[1]]
        if pid[0] == "buffer":
            _, n, dtype, src, arg, tag, size, buf_dtype, data = pid
            u = UOp(Ops.BUFFER, dtype, src, dataclasses.replace(arg, slot=next(UOp.unique_num)), tag)
            if size is not None:
                buf = Buffer(arg.device, size, buf_dtype, initial_value=data, preallocate=data is None)
                buffers[u] = buf.ref(1)
            self.local[n] = u
            return u
        raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")


# ---- key parts ----------------------------------------------------------------------------------------

def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


@functools.cache
def _source_hash(path: str | None) -> str:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16] if path else "unknown"
    except OSError:
        return "unknown"


def _source_file(obj) -> str | None:
    try:
        return inspect.getsourcefile(obj)
    except (TypeError, OSError):     # defined in __main__ of `python -c`, or in C
        return None


@functools.cache
def _code_hash(backend_source: str | None) -> str:
    """tinyclip's own sources (the model, its kernels, the runner) and the backend's module: the code
    that builds the graph."""
    files = sorted(pathlib.Path(__file__).parent.glob("*.py"))
    if backend_source:
        files.append(pathlib.Path(backend_source))
    return hashlib.sha256("".join(f"{f.name}:{_source_hash(str(f))}," for f in files).encode()).hexdigest()[:16]


@functools.cache
def _tinygrad_version() -> str:
    import tinygrad
    try:
        version = importlib.metadata.version("tinygrad")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    root = pathlib.Path(tinygrad.__file__).parent
    digest = hashlib.sha256(b"".join(_source_hash(str(root / p)).encode() for p in TINYGRAD_SOURCES)).hexdigest()
    return f"{version}+{digest[:16]}"


def _codegen(device: str) -> str:
    """The code generator tinygrad uses for `device` now (inside the backend's context), the device's
    name and architecture where tinygrad knows them (binaries are built for one GPU model), and for
    CPU devices the host CPU (tinygrad compiles CPU kernels with -march=native) and the number of
    threads kernels are split between (NUM_CPU_THREADS)."""
    from tinygrad import Device
    from tinygrad.helpers import NUM_CPU_THREADS
    dev = Device[device]
    r = dev.renderer
    what = f"{type(r).__module__}.{type(r).__qualname__}:{getattr(r, 'target', '')}"
    what += "".join(f":{getattr(dev, a)}" for a in ("device_name", "arch") if isinstance(getattr(dev, a, None), str))
    if device.split(":")[0] in ("CPU", "CLANG", "LLVM"):
        what += f":{_host_cpu()}:threads={NUM_CPU_THREADS.value}"
    return what


@functools.cache
def _host_cpu() -> str:
    info = f"{platform.machine()} {platform.processor()}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        info += "".join(dict.fromkeys(lines))      # the first of each distinct line: one core's worth
    except OSError:
        pass
    return hashlib.sha256(info.encode()).hexdigest()[:16]
