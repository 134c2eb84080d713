"""A stage's evaluations run where its training runs: with one rank in the stage's own process
(on the GPU when there is one), else under torchrun on the ``[pipeline]`` ranks, the windows split
over them (``pipeline.evaluate``); the results are the same whatever the world size."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.stage import pipeline_settings, run_logged

ENTRY = "pipeline.evaluate"


def evaluate(build, jobs: list[dict], tokens: Path, seq_len: int, max_tokens: int, tag: str = "evaluate") -> dict:
    """{job name: perplexity result} for ``jobs`` (``pipeline.evaluate.job``) on ``tokens``."""
    from pipeline import launch
    from pipeline.evaluate import run_jobs

    settings = pipeline_settings()
    if settings.world_size() == 1:
        import torch

        from pipeline.data import load_tokens

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return run_jobs(jobs, load_tokens(tokens), seq_len, max_tokens, device=device)
    work = build.resume_dir / "evaluation"
    work.mkdir(parents=True, exist_ok=True)
    plan, out = work / f"{tag}-jobs.json", work / f"{tag}-results.json"
    plan.write_text(json.dumps({"tokens": str(tokens), "seq_len": seq_len, "max_tokens": max_tokens, "jobs": jobs}))
    cmd = launch.torchrun_command(["--jobs", str(plan), "--out", str(out)], settings.nproc_per_node, settings.nnodes,
                                  settings.rdzv_endpoint, module=ENTRY, log_dir=build.rank_logs)
    run_logged(cmd, build.path / f"{tag}.log")
    return json.loads(out.read_text())
