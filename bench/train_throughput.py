"""Training throughput on CPU, 1 rank against 2 ranks (torchrun, DDP), and the share of a
distillation step spent in the teacher's forward, measured side by side in one run.

Uses the gpt-j-tiny shape on a synthetic token stream (no artifacts needed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import launch, train
from pipeline.distill import BMDistill
from pipeline.models import GPTJ
from pipeline.models.gptj import lm_forward
from pipeline.models.presets import resolve_model
from timing import median_time


def ranks_throughput(nproc: int, corpus: Path, out: Path, steps: int, model: str) -> float:
    cmd = launch.torchrun_command(["--save-dir", str(out), "--model", model, "--data", str(corpus),
                                  "--steps", str(steps), "--batch-size", "16", "--seq-len", "128",
                                  "--save-interval", "0", "--warmup", "2"], nproc)
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log = json.loads((out / train.TRAIN_LOG).read_text())
    return log["tokens_this_run"] / log["wall_time_s"]


def teacher_share(steps: int, model: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    config, _ = resolve_model(model)
    student, teacher = GPTJ(config.replace(activation="relu")), GPTJ(config)
    distill = BMDistill.set_forward(student, teacher, lm_forward, ce_logits=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (16, 129))
    inputs, targets = x[:, :-1], x[:, 1:]

    def kd_step():
        loss, _ = distill(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def teacher_forward():
        with torch.no_grad():
            teacher(inputs)

    step_time, teacher_time = median_time(kd_step, steps), median_time(teacher_forward, steps)
    return step_time, teacher_time, teacher_time / step_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="gpt-j-tiny")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "train.npy", np.random.default_rng(0).integers(0, 4096, 500_000).astype(np.uint16))
        one = ranks_throughput(1, tmp, tmp / "one", args.steps, args.model)
        two = ranks_throughput(2, tmp, tmp / "two", args.steps, args.model)
    print(f"{args.model}, global batch 16 x 128 tokens, {args.steps} steps, {os.cpu_count()} CPU cores")
    print(f"  1 rank : {one:8.0f} tokens/s")
    print(f"  2 ranks: {two:8.0f} tokens/s   ({two / one:.2f}x of 1 rank)")
    step, fwd, share = teacher_share(max(3, args.steps // 4), args.model)
    print(f"  distillation step {step * 1e3:.0f} ms, teacher forward {fwd * 1e3:.0f} ms: "
          f"{share:.0%} of the step")


if __name__ == "__main__":
    main()
