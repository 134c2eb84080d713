"""A stage's model work runs where its training runs: with one rank in the stage's own process (on
the GPU when there is one), else under torchrun on the ``[pipeline]`` ranks. Evaluations split
their windows over the ranks (``pipeline.evaluate``); layer-by-layer work (clustering, router
training) splits its layers (``pipeline.layerwise``). Either way the result does not depend on the
world size. (The layers' half is ``tasks.layer_work``, so that only the stages splitting layers
cover its entry point in their versions.)"""
from __future__ import annotations

import json
from pathlib import Path

from tasks.stage import pipeline_settings, run_logged


def local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def on_ranks(build, module: str, job: dict, tag: str) -> Path:
    """Run ``python -m module --job JOB --out OUT`` on the ranks; OUT's path (the rank 0 writes it, if anything)."""
    from pipeline import launch

    settings = pipeline_settings()
    work = build.resume_dir / "ranks-work"
    work.mkdir(parents=True, exist_ok=True)
    plan, out = work / f"{tag}-job.json", work / f"{tag}-results.json"
    plan.write_text(json.dumps(job))
    cmd = launch.torchrun_command(["--job", str(plan), "--out", str(out)], settings.nproc_per_node, settings.nnodes,
                                  settings.rdzv_endpoint, module=module, log_dir=build.rank_logs)
    run_logged(cmd, build.path / f"{tag}.log")
    return out


def evaluate(build, jobs: list[dict], tokens: Path, seq_len: int, max_tokens: int, tag: str = "evaluate",
             reference: dict | None = None) -> dict:
    """{job name: perplexity result} for ``jobs`` (``pipeline.evaluate.job``) on ``tokens``; with a
    ``reference`` job, each model's fidelity to it too (``pipeline.evaluate.run_jobs``)."""
    if pipeline_settings().world_size() == 1:
        from pipeline.data import load_tokens
        from pipeline.evaluate import run_jobs

        return run_jobs(jobs, load_tokens(tokens), seq_len, max_tokens, device=local_device(), reference=reference)
    job = {"tokens": str(tokens), "seq_len": seq_len, "max_tokens": max_tokens, "jobs": jobs, "reference": reference}
    return json.loads(on_ranks(build, "pipeline.evaluate", job, tag).read_text())
