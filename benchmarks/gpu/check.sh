#!/usr/bin/env bash
# The one prepared run on a lent NVIDIA machine (the device tool), from the repository root:
#   run(command="bash benchmarks/gpu/check.sh", carry=[".whl"], timeout_s=500)
# Before it, here, once: python3 -m pip download --no-deps --only-binary=:all: -d .whl tinygrad==0.14.0
# Sets up (tinygrad from the carried wheel, the project installed so its backends register), runs the
# CUDA parity tests (among them the page-locked staging of tests/test_host_path.py, never run on a GPU
# before) and the GPU benchmark (with uint8-crop rows and upload timings: staging against pageable
# copies); everything it prints is also kept under $OUT.
set -u
out="${OUT:-/tmp/tinyclip-gpu}"
mkdir -p "$out"
source benchmarks/gpu/setup-on-device.sh 2>&1 | tee "$out/setup.txt"
export TINYCLIP_CACHE_DIR=/tmp/tinyclip-cache
timeout 200 python3 -m pytest -q -x tests -k cuda -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.txt" | tail -15
timeout 270 python3 benchmarks/speed_gpu.py --repeats 5 2>&1 | tee "$out/speed_gpu.txt"
