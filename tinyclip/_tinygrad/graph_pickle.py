"""Pickling a captured TinyJit graph without the model's weights, and binding it to a model on loading.

tinygrad internals relied on (tinygrad 0.14):
  - tinygrad.engine.jit.CapturedJit: a dataclass (ret, _linear, expected_names, expected_input_info)
    that pickles through its own __reduce__.
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
import io
import pickle

from tinygrad.device import Buffer
from tinygrad.engine.jit import CapturedJit
from tinygrad.nn.state import get_state_dict
from tinygrad.uop.ops import Ops, UOp, buffers


def dumps(captured, model) -> bytes:
    """(the CapturedJit, the buffers its graph writes), pickled with each of `model`'s weights written
    as a reference to its state-dict name."""
    views = [name for name, t in get_state_dict(model).items() if not _device_buffer(t.uop.base)]
    if views:   # its bytes could be neither named nor stored as the model's: a graph would bind another's
        raise pickle.PicklingError(f"weight {views[0]} is a view of another buffer, not a buffer of its own, so a "
                                   "graph file cannot bind it to the model that loads it")
    f = io.BytesIO()
    written = captured._written_uops
    _Pickler(f, model, written).dump((captured, list(written)))
    return f.getvalue()


def loads(payload: bytes, model):
    """The CapturedJit that dumps() wrote, bound to `model`'s weights. Raises when the payload is not a
    captured graph or uses weights this model does not have (by name, size, dtype and device)."""
    loaded = _Unpickler(io.BytesIO(payload), model).load()
    if not (isinstance(loaded, tuple) and len(loaded) == 2 and isinstance(loaded[0], CapturedJit)):
        raise TypeError(f"it holds a {type(loaded).__name__}, not a captured graph")
    captured, written = loaded
    if isinstance(vars(CapturedJit).get("_written_uops"), functools.cached_property):
        captured.__dict__["_written_uops"] = set(written)    # else its first run works it out again (~0.3 s)
    return captured


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
