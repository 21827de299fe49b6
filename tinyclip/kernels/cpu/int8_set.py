"""The CPU kernel set with int8 linear layers (load(..., dtype="int8")).

The model stays float32: embeddings, attention, softmax, layer norms and the ResNet convolutions run
in the float32 CPU kernels. Only the linear layers (and a ViT's patch embedding, a linear layer on
patches) run in int8 (int8.py): their weights are quantised once, at load, and kept on disk
(int8_store.py) keyed by the checkpoint's fingerprint, the tower and the layout, so a later load reads
them back.

Where int8 cannot run, it is refused in one sentence (`problem`), never computed in float32 under
the name int8: a CPU without the VNNI flag of the chosen instruction set, a tinygrad the C-source
kernels were not written for, a device whose compiler does not take C (CPU:LLVM).
"""
from __future__ import annotations

import contextlib
import functools
import pathlib

from tinygrad import Tensor, dtypes

from ... import _tinygrad
from ..._tinygrad import buffers, cpu_runtime
from ...errors import BackendError
from . import CPUKernels, int8, int8_store
from .isa import ISA


def problem(isa: ISA | None, c_source: bool = True, flags: frozenset[str] | None = None) -> str | None:
    """Why int8 linear layers cannot run here (one sentence), or None. `c_source`: whether the backend's
    device compiles C (clang's renderer, not LLVM's: CPUKernels.c_source)."""
    if isa is None:
        return "dtype int8 needs an x86-64 CPU with AVX2 or AVX-512 and VNNI; this CPU has neither instruction set"
    path = int8.choose(isa, flags)
    if isinstance(path, str):
        return path
    if cpu_runtime.tinygrad_version() not in cpu_runtime.TESTED_TINYGRAD:
        return (f"dtype int8 runs C-source kernels written for tinygrad {', '.join(cpu_runtime.TESTED_TINYGRAD)}, "
                f"not {cpu_runtime.tinygrad_version()}")
    if not c_source:
        return "dtype int8 needs kernels compiled from C by clang (the cpu backend), not this device's compiler"
    return None


class Int8Kernels(CPUKernels):
    """CPUKernels whose linear layers compute in int8 (int8.py); everything else is the float32 set's."""

    linear_dtype = "int8"

    def __init__(self, isa: ISA, device: str = "CPU", cache_folder=None, flags: frozenset[str] | None = None,
                 c_source: bool = True):
        super().__init__(isa, device, cache_folder, c_source=c_source)
        path = int8.choose(isa, flags)
        if isinstance(path, str):
            raise BackendError(path + "; use dtype float32")
        self.path = path
        self._store: int8_store.Store | None = None    # while preparing: the store, where there is one
        self._stored: list = []              # while preparing: the arrays read from it
        self._made: list | None = None       # while preparing: the arrays prepare_linear returned, in order
        self._fresh = False

    def key(self) -> dict:
        return {**super().key(), "linear": self.linear_dtype, "int8": self.path.key()}

    def describe(self) -> str:
        return (f"tinyclip's CPU kernels, int8 linear layers ({self.path.name}, per-channel weights, per-row "
                f"activations), the rest float32 ({self.isa.name})")

    @functools.cached_property
    def float32(self) -> CPUKernels:
        """The float32 set on the same machine: the convolutions' weights are not quantised."""
        plain = CPUKernels(self.isa, self.device, self.cache_folder, c_source=self.c_source)
        plain.__dict__["machine"] = self.machine
        return plain

    def without_linear_dtype(self) -> CPUKernels:
        """The float32 set: the final projections, whose outputs are the embeddings, stay float32."""
        return self.float32

    # ---- preparing the weights, with the store ---------------------------------------------------

    @contextlib.contextmanager
    def preparing(self, source):
        """Around model.prepare(): quantised weights are read from the store for `source()` (the checkpoint's
        fingerprint and the tower; None: no store) and written back when any had to be quantised."""
        store = None
        if source is not None and self.cache_folder is not None:
            from ... import __version__
            store = int8_store.Store(pathlib.Path(self.cache_folder) / int8_store.SUBDIR,
                                     {"weights": source(), "layout": self.path.key(), "tinyclip": __version__})
        self._store, self._made, self._fresh = store, [], False
        self._stored = (store.load() if store else None) or []
        try:
            yield
            if store is not None and (self._fresh or len(self._made) != len(self._stored)):
                store.save(self._made)
        finally:
            self._store, self._stored, self._made = None, [], None

    def prepare_linear(self, weight: Tensor) -> Tensor:
        if weight.dtype != dtypes.float32 or weight.ndim != 2:
            raise BackendError(f"dtype int8 quantises float32 (out, in) weights, not {weight.dtype} {weight.shape}")
        self.machine   # measured now, at load time, never inside a JIT capture
        n, k = weight.shape
        i = len(self._made) if self._made is not None else -1
        packed = None
        if 0 <= i < len(self._stored):
            candidate = self._stored[i]
            if candidate.shape == int8.stored_shape(n, k, self.path) and _inputs(candidate, self.path) == k:
                packed = candidate
            else:            # one mismatch: the rest of the file is not trusted either
                self._stored = []
                self._store.mismatch(f"its weight {i} is {candidate.shape}, the model's {(n, k)} quantised is "
                                     f"{int8.stored_shape(n, k, self.path)}")
        if packed is None:
            packed = int8.quantise(buffers.host_array(weight), self.path)
            self._fresh = True
        if self._made is not None:
            self._made.append(packed)
        return _tinygrad.from_numpy(packed, weight.device)

    def dense_weight(self, weight: Tensor) -> Tensor:
        if weight.dtype != dtypes.uint8:
            return self.float32.dense_weight(weight)
        return _tinygrad.from_numpy(int8.dequantise(buffers.host_array(weight), self.path), weight.device)

    def linear(self, x, weight, bias, act=None, residual=None):
        if weight.dtype != dtypes.uint8:     # a convolution's float32 panels (conv2d below)
            return super().linear(x, weight, bias, act, residual)
        x = x.float()
        xq = self._once_per_input(x, "int8 rows", lambda: int8.quantised_rows(x, self.machine))   # q, k, v: one
        return int8.linear(x, weight, bias, act, residual, self.path, self.machine, xq=xq)

    def prepare_conv2d(self, weight: Tensor) -> Tensor:
        return self.float32.prepare_conv2d(weight)


def _inputs(packed, path) -> int | None:
    try:
        return int8.inputs_of(packed, path)
    except ValueError:
        return None
