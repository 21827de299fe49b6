"""The test run's own PoCL kernel cache (tests/conftest.py): kernels that the opencl backend builds
go to a folder of this run, never to the ~/.cache/pocl that other processes on the machine share."""
import os
import subprocess
import sys

import pytest

from tinyclip import registry

BUILD_A_KERNEL = ("import numpy as np; from tinygrad import Tensor; "
                  "print((Tensor(np.arange(8, dtype=np.float32)) * 7 + 1).sum().item())")


def test_the_run_has_a_pocl_cache_of_its_own():
    folder = os.environ.get("POCL_CACHE_DIR")
    assert folder, "POCL_CACHE_DIR is not set: PoCL would share ~/.cache/pocl with every other process"
    assert os.path.isdir(folder) and os.path.realpath(folder) != os.path.realpath(os.path.expanduser("~/.cache/pocl"))


def test_opencl_kernels_are_built_into_it():
    backend = next((b for b in registry.registered() if b.name == "opencl"), None)
    if backend is None or not backend.available:
        pytest.skip("no OpenCL device here")
    folder = os.environ["POCL_CACHE_DIR"]
    before = sum(len(files) for _, _, files in os.walk(folder))
    run = subprocess.run([sys.executable, "-c", BUILD_A_KERNEL], capture_output=True, text=True,
                         env=dict(os.environ, CACHELEVEL="0", DEV="CL"), timeout=300)
    assert run.returncode == 0 and float(run.stdout.split()[-1]) == 204, run.stderr[-2000:]
    assert sum(len(files) for _, _, files in os.walk(folder)) > before
