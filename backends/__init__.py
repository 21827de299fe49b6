"""tinyclip's built-in backends, installed as the package `tinyclip_backends`.

One module per device family. Each registers its Backend classes in setup.cfg
under the entry-point group `tinyclip.backends`, exactly as a third-party
plugin would (see tinyclip/registry.py for the interface).
"""
from __future__ import annotations

import os


def explain(why: str | None, reasons: tuple[tuple[str, str], ...]) -> str | None:
    """A probe's raw tinygrad error turned into a reason a user can act on.

    `reasons` pairs a text to look for in the error with the reason to give; the first match
    wins, and an error that matches none is returned as it is.
    """
    for needle, reason in reasons:
        if why and needle in why:
            return reason
    return why


def nvidia_key() -> str:
    """What the NVIDIA backends' probes depend on (tinyclip.probes): the driver's device files, NVIDIA's
    devices on PCI, the driver and CUDA libraries where the loader looks, and the environment that
    steers them."""
    from tinyclip import probes
    libs = [f"{d}/{name}" for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                                     "/usr/local/cuda*/lib64", "/usr/local/cuda*/targets/*/lib",
                                     *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")))
            for name in ("libcuda.so*", "libnvrtc.so*")]
    return "\n".join((probes.files_key("/dev/nvidia*", "/etc/ld.so.cache", *libs), ",".join(_pci_vendors("0x10de")),
                      probes.env_key("CUDA", "NV", "LD_LIBRARY_PATH", "DEV")))


def _pci_vendors(vendor: str) -> list[str]:
    """The PCI devices (sysfs names) whose vendor id is `vendor` (e.g. "0x10de", NVIDIA)."""
    import glob
    found = []
    for path in sorted(glob.glob("/sys/bus/pci/devices/*/vendor")):
        try:
            with open(path) as f:
                if f.read().strip() == vendor:
                    found.append(path.split("/")[-2])
        except OSError:
            pass
    return found
