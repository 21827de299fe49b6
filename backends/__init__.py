"""tinyclip's built-in backends, installed as the package `tinyclip_backends`.

One module per device family. Each registers its Backend classes in setup.cfg
under the entry-point group `tinyclip.backends`, exactly as a third-party
plugin would (see tinyclip/registry.py for the interface).
"""
from __future__ import annotations


def explain(why: str | None, reasons: tuple[tuple[str, str], ...]) -> str | None:
    """A probe's raw tinygrad error turned into a reason a user can act on.

    `reasons` pairs a text to look for in the error with the reason to give; the first match
    wins, and an error that matches none is returned as it is.
    """
    for needle, reason in reasons:
        if why and needle in why:
            return reason
    return why
