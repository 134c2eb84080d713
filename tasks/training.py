"""Running ``pipeline.train`` under torchrun from a stage, and reading back what it recorded."""
from __future__ import annotations

import json
import re

import luigi

from tasks.stage import CommandFailed, Stage, pipeline_settings, run_logged


class TrainingStage(Stage):
    """A stage that trains under torchrun: the parameters every training stage shares. Each
    subclass lists in ``TRAINING`` those passed to ``pipeline.train`` (and so in its version)."""

    TRAINING: tuple[str, ...] = ("steps", "batch_size", "grad_accum", "seq_len", "start_lr", "warmup",
                                 "weight_decay", "seed")
    steps = luigi.IntParameter(default=1000)
    batch_size = luigi.IntParameter(default=16, description="global batch in sequences")
    grad_accum = luigi.IntParameter(default=1)
    seq_len = luigi.IntParameter(default=128)
    start_lr = luigi.FloatParameter(default=1e-3)
    warmup = luigi.IntParameter(default=20)
    weight_decay = luigi.FloatParameter(default=0.1)
    seed = luigi.IntParameter(default=0)
    eval_tokens = luigi.IntParameter(default=65536, description="held-out tokens for perplexity (0: all)")
    log_interval = luigi.IntParameter(default=10)
    save_interval = luigi.IntParameter(default=50, description="steps between resumable checkpoints")

    def training_params(self) -> dict:
        """The training parameters, checked, with the world size they run on."""
        params = {name: getattr(self, name) for name in self.TRAINING}
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if params[name] <= 0:
                raise ValueError(f"{self.stage_name} {name} is {params[name]}, expected a positive integer")
        settings = pipeline_settings()
        return {**params, "world_size": settings.nproc_per_node * settings.nnodes}

    def training_needs(self, student: float, teacher: float = 0.0, export_int8: bool = False):
        from pipeline import resources

        return resources.training_needs(student, pipeline_settings().nproc_per_node, teacher, export_int8)

    def train(self, build, *args: str) -> None:
        """Run pipeline.train with ``args`` and this stage's training parameters; record its metrics."""
        flags = [*args, "--log-interval", str(self.log_interval), "--save-interval", str(self.save_interval)]
        for name in self.TRAINING:
            flags += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        build.metrics.update(run_training(build, flags, self.log_interval))


def run_training(build, train_args: list[str], log_interval: int) -> dict:
    """Train into the build's directory; return the metrics every training stage records."""
    from pipeline import train

    settings = pipeline_settings()
    cmd = train.torchrun_command(["--save-dir", str(build.path), *train_args], settings.nproc_per_node,
                                 settings.nnodes, settings.rdzv_endpoint, log_dir=build.rank_logs)
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
        raise CommandFailed(f"{cause}; {where} (each rank's output: {build.rank_logs}). {e}") from None
    log = json.loads((build.path / train.TRAIN_LOG).read_text())
    steps = log["loss"][-1][0]
    return {
        "tokens_seen": log["tokens_seen"], "train_wall_time_s": log["wall_time_s"],
        "train_tokens_per_s": round(log["tokens_this_run"] / max(log["wall_time_s"], 1e-9), 1),
        "world_size": log["world_size"], "sharding": log["sharding"],
        "final_train_loss": log["loss"][-1][1],
        "loss_curve": [p for p in log["loss"] if p[0] % log_interval == 0 or p[0] == steps],
    }


def train_model_name(preset: str, variant: str = "") -> str:
    """The training entry point's model name for a pipeline preset (its ``gpt-j`` is the seed's
    14-layer student; the 28-layer model is ``gpt-j-full``), plus a variant suffix like ``-relu``."""
    return ("gpt-j-full" if preset == "gpt-j" else preset) + variant
