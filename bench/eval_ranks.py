"""Evaluation on one rank against two (torchrun), side by side in one run: the same windows of a
model, timed end to end (the torchrun start included) and inside the ranks, and the results
compared.

    python bench/eval_ranks.py [--preset gpt-j-tiny] [--tokens 65536] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline import launch  # noqa: E402
from pipeline.evaluate import job, run_jobs  # noqa: E402
from pipeline.models import GPTJ, from_pretrained, get_preset, save_pretrained  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt-j-tiny")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = get_preset(args.preset)
    save_pretrained(GPTJ(config), work / "model")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=args.tokens + 1).astype(np.uint16)
    np.save(work / "valid.npy", tokens)
    jobs = [job("model", from_pretrained, path=str(work / "model"))]
    plan = work / "jobs.json"
    plan.write_text(json.dumps({"tokens": str(work / "valid.npy"), "seq_len": args.seq_len, "max_tokens": 0,
                                "jobs": jobs}))
    one, two = [], []
    for _ in range(args.runs):  # in turns, so that machine noise hits both alike
        start = time.perf_counter()
        result_one = run_jobs(jobs, tokens, args.seq_len, 0)
        one.append(time.perf_counter() - start)
        start = time.perf_counter()
        cmd = launch.torchrun_command(["--job", str(plan), "--out", str(work / "out.json")], 2, module="pipeline.evaluate")
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        two.append(time.perf_counter() - start)
    result_two = json.loads((work / "out.json").read_text())
    print(f"{args.preset}, {args.tokens} tokens in windows of {args.seq_len}, median of {args.runs} runs in turns")
    print(f"  one rank, in process (torch threads {torch.get_num_threads()}): {statistics.median(one):6.2f} s")
    print(f"  two ranks under torchrun, start included:     {statistics.median(two):6.2f} s")
    print(f"  ratio two / one: {statistics.median(two) / statistics.median(one):.2f}x; "
          f"results identical: {result_two == result_one}")


if __name__ == "__main__":
    main()
