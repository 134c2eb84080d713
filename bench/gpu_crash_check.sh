#!/usr/bin/env bash
# Crash and resume of training on a lent GPU (issue 8), one run of about two minutes: trains
# gpt-j-tiny under torchrun once uninterrupted and once SIGKILLed (the whole process group) after
# its first resumable checkpoint, then resumed; prints whether any rank outlived the kill, where
# the rerun resumed, and how far the resumed weights are from the uninterrupted ones. Ends with
# bench/verify_cost.py on that machine's disk. The device image has torch, numpy and safetensors;
# tqdm travels as a wheel in .whl/ (bench/gpu_wheels.sh). Run from the repository root:
#     bash bench/gpu_crash_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_crash_check}
mkdir -p "$out"
source bench/gpu_env.sh
work=/tmp/gpu_crash_work
model=${MODEL:-gpt-j-tiny} vocab=${VOCAB:-4096} steps=${STEPS:-400} interval=${INTERVAL:-100}  # smaller for a CPU try
rm -rf "$work" && mkdir -p "$work/data"
train() {  # train DIR: the same run every time
    python3 -m torch.distributed.run --nproc_per_node=1 --standalone -m pipeline.train --model "$model" \
        --data "$work/data" --save-dir "$1" --steps "$steps" --save-interval "$interval" --batch-size 16 \
        --seq-len 128 --log-interval "$interval"
}
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "
import numpy as np
rng = np.random.default_rng(0)
np.save('$work/data/train.npy', rng.integers(0, $vocab, 2_000_000).astype(np.uint16))
np.save('$work/data/valid.npy', rng.integers(0, $vocab, 100_000).astype(np.uint16))"
    SECONDS=0
    train "$work/A" >"$out/uninterrupted.log" 2>&1; echo "uninterrupted: exit $? in ${SECONDS} s"
    setsid bash -c "$(declare -f train); work=$work model=$model steps=$steps interval=$interval; train $work/B" >"$out/killed.log" 2>&1 &
    leader=$!
    for _ in $(seq 600); do [ -f "$work/B/resume/checkpoint.pt" ] && break; sleep 0.1; done
    sleep 0.3
    kill -9 -- "-$leader"; wait "$leader" 2>/dev/null
    echo "killed the process group after $(python3 -c "import torch; print(torch.load('$work/B/resume/checkpoint.pt', weights_only=True)['step'])") checkpointed steps"
    sleep 3
    echo "ranks still running 3 s after the kill: $(pgrep -f "save-dir $work/B" | wc -l)"
    train "$work/B" >"$out/resumed.log" 2>&1; echo "resumed run: exit $?; $(grep -m1 'resuming from step' "$out/resumed.log")"
    python3 -c "
from safetensors.torch import load_file
a, b = load_file('$work/A/model.safetensors'), load_file('$work/B/model.safetensors')
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f'resumed vs uninterrupted weights: max abs difference {worst:.3g}, bit-exact: {all((a[k] == b[k]).all() for k in a)}')"
    grep -h "memory plan" "$out/uninterrupted.log" | head -1
    timeout 120 python3 bench/verify_cost.py --mib 2048
} 2>&1 | tee "$out/gpu_crash_check.log"
