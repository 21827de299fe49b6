#!/usr/bin/env bash
# Set up tinyclip on a lent NVIDIA machine (no network there), then smoke-test the GPU devices.
# Seen working on an H200 with torch 2.11+cu130 and transformers 5.17 preinstalled.
#
# Here, before the call (once):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl tinygrad==0.14.0
#   (copied into benchmarks/gpu/ from shared/gpu/)
# There, as the start of the one prepared command (carry .whl):
#   source benchmarks/gpu/setup-on-device.sh && <your checks>
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# installed (not just on the path) so that the tinyclip.backends entry points are found
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
export PATH=/tmp/site/bin:$PATH
nvidia-smi -L
# CC is set to gcc on that image, which tinygrad's CPU device cannot use: tinyclip must explain, not crash
echo "CC=${CC:-unset}"
for d in CUDA NV; do
  timeout 60 python3 -c "from tinygrad import Tensor; print('$d', (Tensor([1.,2.,3.], device='$d')*2).tolist())" 2>&1 | tail -1
done
python3 -m tinyclip backends
