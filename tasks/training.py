"""Running ``pipeline.train`` under torchrun from a stage, and reading back what it recorded."""
from __future__ import annotations

import json
import re

from tasks.stage import pipeline_settings, run_logged


def run_training(build, train_args: list[str], log_interval: int) -> dict:
    """Train into the build's directory; return the metrics every training stage records."""
    from pipeline import train

    settings = pipeline_settings()
    cmd = train.torchrun_command(["--save-dir", str(build.path), *train_args], settings.nproc_per_node,
                                 settings.nnodes, settings.rdzv_endpoint)
    try:
        with build.timed("train"):
            run_logged(cmd, build.path / "train.log")
    except RuntimeError as e:
        resume = build.resume_dir / train.CHECKPOINT
        where = (f"a rerun resumes from the checkpoint in {resume}" if resume.is_file()
                 else "no checkpoint was saved yet, so a rerun starts the training again")
        # torchrun's summary names the first failure under "Root Cause"; other ranks then got SIGTERM
        killed = re.search(r"Signal (\d+) \((SIG\w+)\)", str(e).split("Root Cause")[-1])
        cause = f"a training rank was killed by {killed.group(2)}" if killed else "training failed"
        raise RuntimeError(f"{cause}; {where}. {e}") from None
    log = json.loads((build.path / train.TRAIN_LOG).read_text())
    steps = log["loss"][-1][0]
    return {
        "tokens_seen": log["tokens_seen"], "train_wall_time_s": log["wall_time_s"],
        "train_tokens_per_s": round(log["tokens_this_run"] / max(log["wall_time_s"], 1e-9), 1),
        "world_size": log["world_size"], "sharding": log["sharding"],
        "final_train_loss": log["loss"][-1][1],
        "loss_curve": [p for p in log["loss"] if p[0] % log_interval == 0 or p[0] == steps],
    }


def training_flags(task, names) -> list[str]:
    """``--name value`` for each of the task's parameters ``names`` (underscores become dashes)."""
    out = []
    for name in names:
        out += ["--" + name.replace("_", "-"), str(getattr(task, name))]
    return out


def train_model_name(preset: str, variant: str = "") -> str:
    """The training entry point's model name for a pipeline preset (its ``gpt-j`` is the seed's
    14-layer student; the 28-layer model is ``gpt-j-full``), plus a variant suffix like ``-relu``."""
    return ("gpt-j-full" if preset == "gpt-j" else preset) + variant
