"""Backends: which device a model runs on, found through entry points.

A backend is a small class (see `Backend`) that a package registers in the
entry-point group `tinyclip.backends`; tinyclip's own backends (the
`tinyclip_backends` package, folder `backends/` in the source tree) register
there exactly as a third party would. Nothing device-specific lives outside
the backends.

`resolve(device)` turns what a user typed into a usable backend: a backend
name ("cpu", "opencl"), a raw tinygrad device string ("CPU:LLVM", "CL:1"),
or None for the best available one.
"""
from __future__ import annotations

import contextlib
import functools
from importlib.metadata import entry_points

from .errors import BackendError

GROUP = "tinyclip.backends"


class Backend:
    """What a backend declares. Subclass it and register the class under GROUP.

    name           short user-facing name ("cpu", "cpu-llvm", "opencl", "cuda", "metal")
    device         the tinygrad device string tensors are placed on ("CPU", "CL", "CUDA")
    aliases        raw tinygrad device strings that also select this backend ("CPU:LLVM")
    priority       the default choice is the available backend with the highest priority;
                   accelerators rank above CPUs
    dtypes         dtype names the backend runs, default_dtype the one used when none is asked for
    description    one line for `tinyclip backends`
    """

    name: str = ""
    device: str = ""
    aliases: tuple[str, ...] = ()
    priority: int = 0
    dtypes: tuple[str, ...] = ("float32",)
    default_dtype: str = "float32"
    description: str = ""

    def probe(self) -> str | None:
        """None when the backend can run here, else the reason it cannot (no driver, no compiler ...)."""
        return None

    def context(self) -> contextlib.AbstractContextManager:
        """Settings (tinygrad Context variables) under which this backend's kernels compile and run.
        Every realize of a tinyclip computation happens inside it."""
        return contextlib.nullcontext()

    @functools.cached_property
    def unavailable(self) -> str | None:
        """probe(), asked once per process; an exception from the probe counts as its reason."""
        try:
            return self.probe()
        except Exception as e:   # a probe failing in any way means "not here", with its message
            return f"{type(e).__name__}: {e}".strip()

    @property
    def available(self) -> bool:
        return self.unavailable is None

    def __repr__(self) -> str:
        return f"<backend {self.name} ({self.device})>"


class RawDevice(Backend):
    """A tinygrad device string that no registered backend claims, used as given."""

    def __init__(self, device: str):
        self.name = self.device = device
        self.dtypes = ("float32", "float16")
        self.description = "a tinygrad device that no tinyclip backend registers"

    def probe(self) -> str | None:
        from . import _tinygrad
        return _tinygrad.probe_device(self.device)


@functools.cache
def registered() -> tuple[Backend, ...]:
    """Every backend registered under the entry-point group, sorted by name.

    A plugin that fails to import is listed as unavailable with the import
    error as its reason, rather than breaking tinyclip.
    """
    found: dict[str, Backend] = {}
    for ep in entry_points(group=GROUP):
        try:
            backend = ep.load()()
        except Exception as e:
            backend = _Broken(ep.name, f"plugin {ep.value} failed to load: {type(e).__name__}: {e}")
        if not isinstance(backend, Backend) or backend.name != ep.name:
            backend = _Broken(ep.name, f"plugin {ep.value} is not a tinyclip Backend named {ep.name!r}")
        found.setdefault(ep.name, backend)
    return tuple(sorted(found.values(), key=lambda b: b.name))


class _Broken(Backend):
    def __init__(self, name: str, why: str):
        self.name, self.device, self._why = name, "?", why

    def probe(self) -> str | None:
        return self._why


def resolve(device: str | Backend | None = None) -> Backend:
    """The backend for `device`; a BackendError listing every backend when none fits."""
    if isinstance(device, Backend):
        backends = (device,)
        chosen = device
    else:
        backends = registered()
        chosen = _choose(device, backends)
    if chosen is None or not chosen.available:
        raise BackendError(_listing(device, backends, chosen))
    return chosen


def _choose(device: str | None, backends: tuple[Backend, ...]) -> Backend | None:
    if device is None:
        return next((b for b in sorted(backends, key=lambda b: -b.priority) if b.available), None)
    if not isinstance(device, str) or not device.strip():
        raise BackendError(f"device must be a backend name or a tinygrad device string, got {device!r}")
    for b in backends:
        if device == b.name:
            return b
    wanted = _canonical(device)
    for b in backends:
        if wanted in (_canonical(b.device), *map(_canonical, b.aliases)):
            return b
    family = wanted.split(":")[0]
    if family in _known_tinygrad_devices():
        return RawDevice(wanted)      # e.g. "CL:1" or a device no plugin covers
    return None


def _canonical(device: str) -> str:
    d = device.upper()
    return d[:-2] if d.endswith(":0") else d


def _known_tinygrad_devices() -> set[str]:
    from . import _tinygrad
    return _tinygrad.device_families()


def _listing(device, backends, chosen) -> str:
    if device is None:
        head = "no tinyclip backend is available on this machine."
    elif chosen is None:
        head = f"unknown device {device!r}: not a backend name or a tinygrad device string."
    else:
        head = f"device {device!r} ({chosen.name}) is not available: {chosen.unavailable}"
    rows = [f"  {b.name:<10} {b.device:<10} {'available' if b.available else 'unavailable: ' + str(b.unavailable)}"
            for b in backends]
    return "\n".join([head, "Backends (name, tinygrad device, status):", *rows,
                      "Pass one of the available names as device=..., or see `tinyclip backends`."])
