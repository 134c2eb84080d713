#!/usr/bin/env bash
# The scale check for a lent GPU machine (H100/H200), prepared to finish in about 5 minutes: the
# rehearsal (bench/rehearsal.py: the `make compress` graph at GPT-J width, two layers) on one GPU,
# NPROC=1, so that training, the hidden-state dump and every evaluation run on the device. The
# device's image has torch, safetensors and tokenizers; luigi, h5py and the rest travel as wheels
# in .whl/ (bench/gpu_wheels.sh). Run from the repository root through the device tool with
# carry [".whl"]:
#     bash bench/gpu_scale_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_scale_check}
mkdir -p "$out"
source bench/gpu_env.sh
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    timeout 300 python3 bench/rehearsal.py --work /tmp/rehearsal --nproc 1
    cp /tmp/rehearsal/*.log "$out/" 2>/dev/null
} 2>&1 | tee "$out/gpu_scale_check.log"
