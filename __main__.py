"""`python -m tinyclip` run from the folder that holds this clone reaches this file: Python took the
clone's folder for the `tinyclip` package (tinyclip/shadow.py says why). Say so, and what to do."""
import os
import pathlib
import sys

clone = pathlib.Path(os.path.abspath(__file__)).parent
sys.exit(f"tinyclip: error: Python took {clone}, the clone of the repository, for the tinyclip package (it "
         f"looks in the current folder first); run from another folder (e.g. cd {clone}), or run "
         f"{clone / '.venv' / 'bin' / 'tinyclip'}")
