"""Backends: which device a model runs on, found through entry points.

A backend is a small class (see `Backend`) that a package registers in the
entry-point group `tinyclip.backends`; tinyclip's own backends (the
`tinyclip_backends` package, folder `backends/` in the source tree) register
there exactly as a third party would:

    [options.entry_points]
    tinyclip.backends =
        mycpu = mypackage.backend:MyCPU

A backend chooses its device, its tinygrad settings and its kernel set (tinyclip.kernels: how the
model's hot operations are computed there); the model itself has no device branches.

`select(device)` turns what a user typed into a usable backend: a backend
name ("cpu", "opencl"), a raw tinygrad device string ("CPU:LLVM", "CL:1"),
"gpu" for the best available accelerator, or None for the best available one.
"""
from __future__ import annotations

import contextlib
import functools
from importlib.metadata import entry_points

from .errors import BackendError
from .trust import guard_kernel_cache

GROUP = "tinyclip.backends"
GPU = "gpu"                   # device="gpu": the best available accelerator
ACCELERATOR_PRIORITY = 50     # backends ranked at or above this are accelerators (CPU ones rank below)


class Backend:
    """What a backend declares. Subclass it and register the class under GROUP.

    name           short user-facing name ("cpu", "cpu-llvm", "opencl", "cuda", "metal"); must equal
                   the entry-point name
    device         the tinygrad device string tensors are placed on ("CPU", "CL", "CUDA")
    aliases        raw tinygrad device strings that also select this backend ("CPU:LLVM")
    priority       the default choice is the available backend with the highest priority;
                   accelerators rank above CPUs
    dtypes         dtype names the backend can run where its device works; `usable_dtypes`
                   checks them here. default_dtype is used when none is asked for. A linear dtype
                   (kernels.LINEAR_DTYPES: "bfloat16", "int8") runs where the kernel set says it can
                   (KernelSet.linear_dtype_problem)
    description    one line for `tinyclip backends`
    tf32           whether load(allow_tf32=True) changes anything here: tinygrad then runs float32
                   matmuls on TF32 tensor cores (NVIDIA's CUDA and NV devices only)

    A backend overrides `probe()` to say why it cannot run (the default runs
    one kernel), `context()` for device-specific tinygrad settings, and
    `kernel_set()` to compute the model's hot operations with kernels of its own.
    `probe_key()` names what its probe's answer depends on, so that an "unavailable" answer is
    remembered between processes (tinyclip/probes.py) and the next process skips the probe.
    """

    name: str = ""
    device: str = ""
    aliases: tuple[str, ...] = ()
    priority: int = 0
    dtypes: tuple[str, ...] = ("float32",)
    default_dtype: str = "float32"
    description: str = ""
    tf32: bool = False

    def probe(self) -> str | None:
        """None when the backend can run here, else the reason it cannot (no driver, no compiler ...)."""
        from . import _tinygrad
        return _tinygrad.probe_device(self.device, self.context())

    def context(self) -> contextlib.AbstractContextManager:
        """Settings (tinygrad Context variables) under which this backend's kernels compile and run.
        Every realize of a tinyclip computation happens inside it."""
        return contextlib.nullcontext()

    def kernel_set(self):
        """The tinyclip.kernels.KernelSet the model computes with on this backend: the plain tinygrad set
        unless the backend brings its own (the cpu backends: tinyclip's tiled CPU kernels)."""
        from .kernels import TINYGRAD
        return TINYGRAD

    def probe_key(self) -> str | None:
        """What probe()'s answer depends on besides tinyclip's and tinygrad's versions (driver and library
        files with their sizes and times, environment variables: probes.files_key, probes.env_key), or None
        (the default) to probe in every process. Any change to it makes the next process probe again."""
        return None

    @functools.cached_property
    def _probe_key(self) -> str | None:
        try:
            return self.probe_key()
        except Exception:   # a key that cannot be computed: probe every time
            return None

    def remembered(self, name: str, compute):
        """compute(), a JSON value, remembered between processes under probe_key() (None: not remembered)."""
        from . import probes
        if (key := self._probe_key) is None:
            return compute()
        found = probes.recall(self, key)
        if name in found:
            return found[name]
        value = compute()
        probes.remember(self, key, **{name: value})
        return value

    @functools.cached_property
    def unavailable(self) -> str | None:
        """probe(), asked once per process; an exception from the probe counts as its reason. An
        "unavailable" answer is remembered between processes under probe_key() (tinyclip/probes.py);
        "available" is always found out afresh."""
        from . import probes
        key = self._probe_key
        if key is not None and (why := probes.recall(self, key).get("unavailable")):
            return why
        try:
            why = self.probe()
        except Exception as e:   # a probe failing in any way means "not here", with its message
            why = f"{type(e).__name__}: {e}".strip()
        if key is not None and why:
            probes.remember(self, key, unavailable=why)
        return why

    @property
    def available(self) -> bool:
        return self.unavailable is None

    @functools.cached_property
    def usable_dtypes(self) -> tuple[str, ...]:
        """The declared dtypes that run here, found by running a kernel in each (float32 is the
        probe's). An unavailable backend runs none; its declared `dtypes` are all we know."""
        if not self.available:
            return ()
        from . import _tinygrad
        from .kernels import LINEAR_DTYPES
        return tuple(d for d in self.dtypes
                     if d == "float32" or (d == "float16" and _tinygrad.supports_half(self.device, self.context()))
                     or (d in LINEAR_DTYPES and self.kernel_set().linear_dtype_problem(d) is None))

    def check_dtype(self, dtype: str | None) -> str:
        """The dtype name to load with: `dtype`, or default_dtype for None.

        Raises ValueError for a name tinyclip does not know and BackendError when this
        backend does not run it here.
        """
        from . import _tinygrad
        from .kernels import LINEAR_DTYPES
        if dtype in LINEAR_DTYPES:     # the linear layers only; the kernel set says where it runs, in one line
            if why := self.kernel_set().linear_dtype_problem(dtype):
                raise BackendError(f"backend {self.name} ({self.device}) does not run {dtype}: {why}")
            return dtype
        try:
            dt = _tinygrad.dtype_named(dtype or self.default_dtype)
        except ValueError:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of float32, float16, "
                             f"{', '.join(LINEAR_DTYPES)}") from None
        name = next(k for k, v in _tinygrad.DTYPES.items() if v == dt)
        # float32 runs wherever the backend does (its probe ran a float32 kernel): no test kernel for it, and
        # none for the other dtypes, which a float32 load does not need (float16's cost a first schedule: 0.3 s)
        if not (name == "float32" and name in self.dtypes and self.available) and name not in self.usable_dtypes:
            declared = "" if name not in self.dtypes else f" here (a {name} test kernel failed)"
            raise BackendError(f"backend {self.name} ({self.device}) does not run {name}{declared}; it runs "
                               f"{', '.join(self.usable_dtypes) or 'nothing here'}. Pass dtype= one of those, "
                               f"or another device (see `tinyclip backends`).")
        return name

    def __repr__(self) -> str:
        return f"<backend {self.name} ({self.device})>"


class RawDevice(Backend):
    """A tinygrad device string that no registered backend claims, used as given.

    "FAMILY:N" is device number N. "FAMILY:RENDERER" (e.g. "CPU:X86") is the
    family's device compiled by that renderer: tinygrad 0.14 reads the renderer
    from its DEV setting, not from the device string, so it goes to context().
    """

    dtypes = ("float32", "float16")
    description = "a tinygrad device that no tinyclip backend registers"

    def __init__(self, device: str):
        self.name = device
        family, _, rest = device.partition(":")
        self.device, self._dev = (family, device) if rest and not rest.isdigit() else (device, None)

    def context(self):
        if self._dev is None:
            return contextlib.nullcontext()
        from tinygrad.helpers import Context
        return Context(DEV=self._dev)


@functools.cache
def registered() -> tuple[Backend, ...]:
    """Every backend registered under the entry-point group, sorted by name.

    A plugin that fails to import is listed as unavailable with the import
    error as its reason, rather than breaking tinyclip.
    """
    guard_kernel_cache()     # before any plugin opens a device: tinygrad may read its kernel cache then
    found: dict[str, Backend] = {}
    for ep in entry_points(group=GROUP):
        try:
            obj = ep.load()
            backend = obj() if isinstance(obj, type) else obj
        except Exception as e:
            backend = _Broken(ep.name, f"plugin {ep.value} failed to load: {type(e).__name__}: {e}")
        if not isinstance(backend, Backend) or backend.name != ep.name:
            backend = _Broken(ep.name, f"plugin {ep.value} is not a tinyclip Backend named {ep.name!r}")
        found.setdefault(ep.name, backend)
    return tuple(sorted(found.values(), key=lambda b: b.name))


class _Broken(Backend):
    """A registered entry point that did not give a Backend: listed, never chosen."""

    dtypes = ()

    def __init__(self, name: str, why: str):
        self.name, self.device, self._why = name, "?", why
        self.description = "a plugin that failed to load"

    def probe(self) -> str | None:
        return self._why


def default() -> Backend | None:
    """The available backend with the highest priority, or None."""
    return _choose(None, registered())


def select(device: str | Backend | None = None) -> Backend:
    """The backend for `device`; a one-line BackendError when none fits (every backend in its `table`)."""
    if isinstance(device, Backend):
        backends = (device,)
        chosen = device
    else:
        backends = registered()
        chosen = _choose(device, backends)
    if chosen is None or not chosen.available:
        usable = [b.name for b in _by_priority(backends) if b.available]
        raise BackendError(f"{_head(device, chosen).rstrip('.')}; backends that run here: {', '.join(usable) or 'none'}. "
                           "Pass one of them as device=..., or see `tinyclip backends`", table=_listing(backends))
    return chosen


def _choose(device: str | None, backends: tuple[Backend, ...]) -> Backend | None:
    if device is None:
        return next((b for b in _by_priority(backends) if b.available), None)
    if not isinstance(device, str) or not device.strip():
        raise BackendError(f"device must be a backend name or a tinygrad device string, got {device!r}")
    device = device.strip()
    if device.lower() == GPU:
        return next((b for b in _by_priority(backends) if b.available and b.priority >= ACCELERATOR_PRIORITY), None)
    for b in backends:
        if device.lower() == b.name.lower():
            return b
    wanted = _canonical_device(device)
    # Several backends may share a device ("cpu" and "cpu-llvm" are both CPU): the preferred one wins.
    for b in _by_priority(backends):
        if wanted in (_canonical_device(b.device), *map(_canonical_device, b.aliases)):
            return b
    if wanted.split(":")[0] in _known_tinygrad_devices():
        return RawDevice(wanted)      # e.g. "CL:1", "CPU:X86", or a device no plugin covers
    return None


def _by_priority(backends):
    # Asking an unavailable backend its priority is allowed to fail (OpenCL asks the driver).
    def key(b):
        try:
            return -b.priority
        except Exception:
            return 0
    return sorted(backends, key=key)


def _canonical_device(device: str) -> str:
    d = device.upper()
    return d[:-2] if d.endswith(":0") else d


def _known_tinygrad_devices() -> set[str]:
    from . import _tinygrad
    return _tinygrad.device_families()


def status(b: Backend) -> str:
    return "available" if b.available else f"unavailable: {b.unavailable}"


def shown_device(b: Backend) -> str:
    """The tinygrad device with its compiler where an alias names one ("CPU:CLANG", "CPU:LLVM"),
    so that backends sharing a device look different in listings."""
    family = b.device.upper() + ":"
    return next((a for a in b.aliases if a.upper().startswith(family) and not a[len(family):].isdigit()), b.device)


def summary(device) -> str:
    """Why `device` cannot be used, and the names that can, in one line (for the command line)."""
    backends = registered()
    usable = [b.name for b in _by_priority(backends) if b.available]
    chosen = None if device is None or (isinstance(device, str) and device.strip().lower() == GPU) \
        else _choose(device, backends)
    return (f"{_head(device, chosen).rstrip('.')}; backends that run here: {', '.join(usable) or 'none'} "
            "(`tinyclip backends` says why the others are not)")


def _head(device, chosen) -> str:
    if device is None:
        return "no tinyclip backend is available on this machine."
    if chosen is None and isinstance(device, str) and device.strip().lower() == GPU:
        return "no GPU backend is available here."
    if chosen is None:
        return f"unknown device {device!r}: not a backend name or a tinygrad device string."
    return f"device {device!r} ({chosen.name}) is not available: {chosen.unavailable}"


def _listing(backends) -> str:
    """Every backend, its tinygrad device and its status, one per line (BackendError.table)."""
    width = max((len(b.name) for b in backends), default=0)
    dwidth = max((len(b.device) for b in backends), default=0)
    rows = [f"  {b.name:<{width}}  {b.device:<{dwidth}}  {status(b)}" for b in backends]
    return "\n".join(["Backends (name, tinygrad device, status):", *rows])
