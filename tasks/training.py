"""Running ``pipeline.train`` under torchrun from a stage, and reading back what it recorded."""
from __future__ import annotations

import json
import re


from tasks.params import Count, Int, Number, SeqLen
from tasks.stage import CommandFailed, Stage, pipeline_settings, run_logged


class TrainingStage(Stage):
    """A stage that trains under torchrun: the parameters every training stage shares. Each
    subclass lists in ``TRAINING`` those passed to ``pipeline.train`` (and so in its version)."""

    TRAINING: tuple[str, ...] = ("steps", "batch_size", "grad_accum", "seq_len", "start_lr", "warmup",
                                 "weight_decay", "seed")
    steps = Count()
    batch_size = Count(description="global batch in sequences")
    grad_accum = Count(description="micro-batches per step")
    seq_len = SeqLen()
    start_lr = Number(above=0)
    warmup = Count(0, description="steps of linear learning-rate warmup")
    weight_decay = Number(at_least=0)
    seed = Int()
    eval_tokens = Count(zero="all", at_least="seq_len", description="held-out tokens for perplexity (0: all)")
    log_interval = Count(description="steps between logged losses")
    save_interval = Count(zero="never", description="steps between resumable checkpoints")

    ENTRY = "pipeline.train"

    @classmethod
    def progress(cls, resume, params: dict) -> str:
        from pipeline.train import CHECKPOINT

        try:
            step = json.loads((resume / CHECKPOINT).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return super().progress(resume, params)
        return f"partial: resumable from step {step} of {params.get('steps', '?')}"

    def unused_params(self) -> set[str]:
        """Names in ``TRAINING`` that cannot change this run's output under its other settings:
        neither passed to training nor in the version."""
        return set()

    def training_flags(self) -> list[str]:
        return [name for name in self.TRAINING if name not in self.unused_params()]

    def training_params(self) -> dict:
        """The training parameters, checked, with the world size and the precision setting they run on."""
        params = {name: getattr(self, name) for name in self.training_flags()}
        settings = pipeline_settings()
        world = settings.world_size()
        if self.batch_size % (world * self.grad_accum):
            raise ValueError(f"{self.stage_name} batch_size is {self.batch_size}, expected a multiple of grad_accum "
                             f"{self.grad_accum} x {world} rank(s) (each rank's micro-batches are equal)")
        return {**params, "world_size": world, "precision": checked_precision(settings.precision)}

    def check_inputs(self, inputs) -> None:
        from tasks.corpus import check_windows

        if "Corpus" in inputs:
            check_windows(inputs["Corpus"], self.seq_len)

    def training_needs(self, teacher: bool = False, export_int8: bool = False, evaluations: int = 1,
                       reference: bool = False):
        """A training stage's needs: ``resources.training_needs`` for disk and host memory; the
        FLOPs of training (6 per parameter and token, 2 more for the teacher's forward) and of its
        ``evaluations`` (against the teacher with ``reference``); per rank, ``pipeline.memory``'s
        plan for the sharding that fits."""
        from pipeline import memory, resources

        settings, student = pipeline_settings(), self.model_bytes()
        needs = resources.training_needs(student, settings.nproc_per_node, student if teacher else 0.0, export_int8)
        params, world = student / 4, settings.world_size()
        tokens = self.steps * self.batch_size * self.seq_len
        eval_flops, eval_bytes = self.evaluation_needs(evaluations, self.eval_tokens or tokens, reference)
        needs.flops = (6 + (2 if teacher else 0)) * params * tokens + eval_flops
        config = settings.architecture()
        per_rank = self.batch_size // (world * self.grad_accum)
        plans = [memory.plan(config, world, sharding, per_rank, self.seq_len, 4, float("inf"),
                             config if teacher else None) for sharding in ("ddp", "fsdp")]
        needs.rank_memory = max(min(p.total for p in plans), eval_bytes)  # training, then its evaluations
        import torch

        if not torch.cuda.is_available():  # the ranks train in host memory
            needs.memory = max(needs.memory, settings.nproc_per_node * needs.rank_memory)
        return needs

    def train(self, build, *args: str) -> None:
        """Run pipeline.train with ``args`` and this stage's training parameters; record its metrics."""
        flags = [*args, "--log-interval", str(self.log_interval), "--save-interval", str(self.save_interval),
                 "--precision", training_precision()]
        for name in self.training_flags():
            flags += ["--" + name.replace("_", "-"), str(getattr(self, name))]
        build.metrics.update(run_training(build, flags, self.log_interval, self.ENTRY))


def checked_precision(value: str) -> str:
    from pipeline.precision import CHOICES

    if value not in CHOICES:
        raise ValueError(f"[pipeline] precision is {value!r}, expected one of {', '.join(CHOICES)}")
    return value


def training_precision() -> str:
    """[pipeline] precision as the training ranks run it (``pipeline.precision``), resolved here
    once for every rank."""
    import torch

    from pipeline.precision import resolve

    return resolve(checked_precision(pipeline_settings().precision), "cuda" if torch.cuda.is_available() else "cpu")


KD = ("kd_ce_logits", "kd_temp", "kd_mse_last_hidden", "kd_mse_hidden", "kd_loss_scale")  # BMDistill's terms


class DistillingStage(TrainingStage):
    """A training stage with a teacher: BMDistill's terms and the activation penalty."""

    TRAINING = TrainingStage.TRAINING + KD + ("act_l1",)
    kd_ce_logits = Number(at_least=0, description="soft cross-entropy against the teacher's logits")
    kd_temp = Number(above=0)
    kd_mse_last_hidden = Number(at_least=0)
    kd_mse_hidden = Number(at_least=0)
    kd_loss_scale = Number(above=0)
    act_l1 = Number(at_least=0, description="L1 penalty on FFN activations (raises sparsity)")


def unused_distill_params(stage, distill: bool) -> set[str]:
    """The distillation parameters that cannot change ``stage``'s output: all without distillation;
    the temperature when the logits term is off (it only softens the logits)."""
    if not distill:
        return set(KD)
    return set() if stage.kd_ce_logits else {"kd_temp"}


def rank_signal(output: str) -> str | None:
    """The signal that ended a rank, from torchrun's failure summary: the root cause's, else any
    rank's but the SIGTERM that torchrun sends the other ranks once one has failed (the root
    cause is the first failure torchrun recorded, which can be a survivor's error about the
    killed peer)."""
    signals = re.findall(r"Signal \d+ \((SIG\w+)\)", output.split("Root Cause")[-1])
    signals += [s for s in re.findall(r"Signal \d+ \((SIG\w+)\)", output) if s != "SIGTERM"]
    return signals[0] if signals else None


def run_training(build, train_args: list[str], log_interval: int, entry: str) -> dict:
    """Train into the build's directory with the ``entry`` module; return the metrics every
    training stage records."""
    from pipeline import launch
    from pipeline.train import CHECKPOINT, TRAIN_LOG

    settings = pipeline_settings()
    cmd = launch.torchrun_command(["--save-dir", str(build.path), *train_args], settings.nproc_per_node,
                                  settings.nnodes, settings.rdzv_endpoint, module=entry, log_dir=build.rank_logs)
    try:
        with build.timed("train"):
            run_logged(cmd, build.path / "train.log")
    except CommandFailed as e:
        resume = build.resume_dir / CHECKPOINT
        where = (f"a rerun resumes from the checkpoint in {resume}" if resume.is_file()
                 else "no checkpoint was saved yet, so a rerun starts the training again")
        killed = rank_signal(e.output)
        cause = f"a training rank was killed by {killed}" if killed else "training failed"
        raise CommandFailed(f"{cause}; {where} (each rank's output: {build.rank_logs}). {e}") from None
    log = json.loads((build.path / TRAIN_LOG).read_text())
    steps = log["loss"][-1][0]
    return {
        "tokens_seen": log["tokens_seen"], "train_wall_time_s": log["wall_time_s"],
        "train_tokens_per_s": round(log["tokens_this_run"] / max(log["wall_time_s"], 1e-9), 1),
        "world_size": log["world_size"], "sharding": log["sharding"], "precision": log["precision"],
        "final_train_loss": log["loss"][-1][1],
        "loss_curve": [p for p in log["loss"] if p[0] % log_interval == 0 or p[0] == steps],
    }


def train_model_name(preset: str, variant: str = "") -> str:
    """The training entry point's model name for a pipeline preset (its ``gpt-j`` is the seed's
    14-layer student; the 28-layer model is ``gpt-j-full``), plus a variant suffix like ``-relu``."""
    return ("gpt-j-full" if preset == "gpt-j" else preset) + variant
