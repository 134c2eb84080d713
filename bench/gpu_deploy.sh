#!/usr/bin/env bash
# The serving benchmark for a lent GPU machine (H100/H200), one run of at most five minutes:
# a GPT-J-6B-shaped model as bf16, int8, int8 + MoE (20% of 512 experts) and int8 + 2:4, each
# compiled the same way, decode and prefill as ratios to bf16 (bench/gpu_deploy.py). torch and
# safetensors come with the device's image, tqdm as a wheel in .whl/ (bench/gpu_wheels.sh). Run
# from the repository root through the device tool with carry [".whl"]:
#     bash bench/gpu_deploy.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_deploy}
mkdir -p "$out"
source bench/gpu_env.sh
{
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, '| cuSPARSELt:', torch.backends.cusparselt.is_available())"
    timeout 280 python3 bench/gpu_deploy.py --json "$out/gpu_deploy.json"
} 2>&1 | tee "$out/gpu_deploy.log"
