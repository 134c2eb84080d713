#!/usr/bin/env bash
# The GPU check for a lent device machine, one run of about two minutes. The device's image has
# torch, pytest, safetensors and tokenizers; cpm_kernels (and setuptools<82 for its
# pkg_resources) travel as wheels in .whl/, made here first with bench/gpu_wheels.sh.
# Run from the repository root through the device tool with carry [".whl"]:
#     bash bench/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
source bench/gpu_env.sh
{
    nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
    python3 -c "import torch, kernels; print('torch', torch.__version__, '| int8 backend on cuda:', kernels.int8_backend('cuda'), '| cpm_kernels:', kernels.cpm_kernels_status())"
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_int8.py 2>&1 | tail -5
    timeout 150 python3 bench/int8.py --device cuda --runs 20
} 2>&1 | tee "$out/gpu_check.log"
