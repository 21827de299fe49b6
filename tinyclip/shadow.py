"""A folder named `tinyclip` in the current folder hides the package from a Python started there.

A clone of the repository is such a folder: it has no __init__.py (its package is the `tinyclip/`
inside it), and Python puts the current folder first on sys.path for `python -c`, `python -m`,
the interactive prompt and Ray's workers (Ray adds the driver's current folder to theirs). Python
then imports the clone's folder as an empty namespace package, unless a regular `tinyclip`
package lies on sys.path too (a non-editable install does; an editable one, reached through an
import hook that Python asks only after sys.path, does not). `import tinyclip` "works", and then
`tinyclip.load` is an AttributeError and a Ray worker's import an ImportError.

No code of tinyclip's runs in a process where this has happened, so it is caught where code does
run: the repository root's __main__.py (what `python -m tinyclip` runs there) and, before Ray
starts, tinyclip.ray (whose driver imported tinyclip fine, through the `tinyclip` command).
A script's own `import tinyclip` cannot be caught; README.md says what to do.
"""
from __future__ import annotations

import os
import pathlib


def shadowing_folder(folder: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The folder `tinyclip` in `folder` (default: the current one) that Python would import as an
    empty namespace package instead of tinyclip, or None."""
    candidate = pathlib.Path(folder if folder is not None else os.getcwd()) / "tinyclip"
    if not candidate.is_dir() or (candidate / "__init__.py").exists():
        return None
    return candidate


def explain(found: pathlib.Path, who: str) -> str:
    """One line: what `who` would import instead of tinyclip, and what to do."""
    clone = " (a clone of the repository: its package is the tinyclip/ inside it)" \
        if (found / "tinyclip" / "__init__.py").is_file() else ""
    return (f"{who} would import the folder {found}{clone} as an empty `tinyclip` package, since Python looks in "
            f"the current folder first; run from another folder (e.g. cd {found})")
