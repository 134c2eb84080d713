"""Perplexity on held-out tokens: deterministic, batched, with a progress bar."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import resources


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens (input plus shifted target). All of them,
    or with ``max_tokens`` that many targets' worth spread evenly over the whole split (so one
    large file at its start cannot dominate)."""
    total = (len(tokens) - 1) // seq_len
    if total < 1:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    n = min(total, max(1, max_tokens // seq_len)) if max_tokens else total
    starts = (np.arange(n) * total // n) * seq_len
    return np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_tokens: int = 0,
               device: str | torch.device = "cpu", desc: str = "eval", ffn_sparsity: bool = False,
               rank: int = 0, world: int = 1, teacher=None) -> dict:
    """Mean next-token cross-entropy and its exponential over the evaluation windows; with
    ``ffn_sparsity`` also, per layer, the share of FFN activations that are exactly zero (the
    share of ``fc_in`` outputs at or below zero, which ReLU zeroes); with a ``teacher``, the
    fidelity to it on the same windows: the mean per-token KL divergence of the model's
    next-token distribution from the teacher's (``kl``) and the share of positions where both
    rank the same token first (``top1_agreement``). ``teacher`` gives the teacher's next-token
    log-probabilities for a batch of inputs (a ``TeacherOutputs``).

    With ``world`` ranks (a process group), batch ``b`` is computed by rank ``b % world`` and the
    per-batch sums are reduced, each batch's own sum added to zeros: every rank returns exactly
    what one rank computes, whatever the world size."""
    was_training = model.training
    model.eval()
    data = torch.from_numpy(windows(tokens, seq_len, max_tokens))
    starts = range(0, len(data), batch_size)
    sums = torch.zeros(len(starts), 3 if teacher is not None else 1, dtype=torch.float64)
    zeros = torch.zeros(len(model.transformer.h) if ffn_sparsity else 0, 2, dtype=torch.int64)
    hooks = []
    for i, block in enumerate(model.transformer.h if ffn_sparsity else ()):
        def tally(module, inputs, output, layer=i):
            zeros[layer, 0] += int((output <= 0).sum())
            zeros[layer, 1] += output.numel()
        hooks.append(block.mlp.fc_in.register_forward_hook(tally))
    try:
        mine = [b for b in range(len(starts)) if b % world == rank]
        for b in tqdm(mine, desc=desc, unit="batch", leave=False, disable=rank != 0):
            chunk = data[starts[b]:starts[b] + batch_size].to(device)
            logits = model(chunk[:, :-1]).float()
            sums[b, 0] = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            if teacher is not None:
                sums[b, 1:] = torch.tensor(fidelity_sums(logits, teacher(chunk[:, :-1])))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if world > 1:
        sums, zeros = _all_reduce(sums), _all_reduce(zeros)
    count = data[:, 1:].numel()
    totals = sums.sum(0).tolist()
    result = {"loss": totals[0] / count, "perplexity": math.exp(totals[0] / count), "tokens": count}
    if teacher is not None:
        result.update(kl=totals[1] / count, top1_agreement=totals[2] / count)
    if ffn_sparsity:
        result["ffn_sparsity"] = [int(z) / int(n) for z, n in zeros.tolist()]
    return result


PROMPTS, NEW_TOKENS = 16, 32  # greedy agreement: prompts from the evaluated split, tokens generated for each


def fidelity_sums(logits: torch.Tensor, teacher_log_p: torch.Tensor) -> tuple[float, float]:
    """(sum over positions of KL(teacher || model), positions where both rank the same token first),
    from the teacher's next-token log-probabilities."""
    log_q = F.log_softmax(logits, dim=-1)
    # per position over the vocabulary, then over positions in float64: the same sums in the same
    # order whatever the thread count (one big reduction is split over threads differently)
    kl = (teacher_log_p.exp() * (teacher_log_p - log_q)).sum(-1).double().sum()
    return float(kl), float((teacher_log_p.argmax(-1) == logits.argmax(-1)).sum())


class TeacherOutputs:
    """The teacher's next-token log-probabilities for a batch of inputs. Every model of an
    evaluation reads the same windows, so the teacher's are computed once, for the first model,
    and kept for the others while they fit in ``budget`` bytes (the rest are recomputed: the same
    values either way, the forward being deterministic for the same batch)."""

    def __init__(self, model, budget: int | None = None):
        self.model, self.kept, self.held = model, {}, 0
        self.budget = resources.TEACHER_CACHE_BYTES if budget is None else budget

    def to(self, device) -> "TeacherOutputs":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        key = (inputs.shape, inputs.cpu().numpy().tobytes())
        if key in self.kept:
            return self.kept[key].to(inputs.device)
        log_p = F.log_softmax(self.model(inputs).float(), dim=-1)
        size = log_p.numel() * log_p.element_size()
        if self.held + size <= self.budget:
            self.kept[key], self.held = log_p, self.held + size
        return log_p


@torch.no_grad()
def teacher_continuations(teacher, tokens: np.ndarray, prompts: int = 16, prompt_len: int = 32,
                          new_tokens: int = 32, device: str | torch.device = "cpu", rank: int = 0,
                          world: int = 1) -> dict[int, torch.Tensor]:
    """{prompt p: its ``prompt_len`` tokens and the teacher's ``new_tokens`` greedy ones} for this
    rank's prompts (``p % world == rank``) of ``prompts`` taken evenly from ``tokens``, each
    generated on its own (a batch of one: the same tokens whatever the world size)."""
    if len(tokens) < prompt_len:
        raise ValueError(f"greedy agreement: {len(tokens)} tokens, fewer than one prompt of {prompt_len}")
    starts = np.arange(prompts) * (len(tokens) - prompt_len) // max(1, prompts - 1)
    was_training = teacher.training
    teacher.eval()
    out = {}
    for p in range(rank, prompts, world):
        x = torch.from_numpy(np.asarray(tokens[starts[p]:starts[p] + prompt_len]).astype(np.int64))[None].to(device)
        for _ in range(new_tokens):
            x = torch.cat([x, teacher(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
        out[p] = x.cpu()
    teacher.train(was_training)
    return out


@torch.no_grad()
def greedy_agreement(model, continuations: dict[int, torch.Tensor], prompts: int, new_tokens: int = 32,
                     device: str | torch.device = "cpu", world: int = 1) -> float:
    """The mean number of tokens the model's greedy generation shares with the teacher's
    (``teacher_continuations``) before the first difference, out of ``new_tokens``. Until they
    differ, the model reads exactly the teacher's tokens, so one forward over the teacher's
    sequence tells where its first own choice departs."""
    was_training = model.training
    model.eval()
    matched = torch.zeros(prompts, dtype=torch.float64)
    for p, seq in continuations.items():
        seq = seq.to(device)
        choice = model(seq[:, :-1])[:, -new_tokens:].argmax(-1)
        matched[p] = float((choice == seq[:, -new_tokens:]).long().cumprod(dim=1).sum())
    model.train(was_training)
    if world > 1:
        matched = _all_reduce(matched)
    return float(matched.mean())


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, on the device the process group's backend reduces on (NCCL: the GPU)."""
    import torch.distributed as dist

    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    reduced = tensor.to(on)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


# Evaluation jobs: what a stage asks to be evaluated, run in its own process (one rank) or by the
# ranks of a torchrun job. A job names its loader as "module:function" (a function the stage's
# own code imports, so that its version covers it) with keyword arguments.

def job(name: str, loader, ffn_sparsity: bool = False, cpu: bool = False, **kwargs) -> dict:
    """An evaluation of the model ``loader(**kwargs)`` returns; ``cpu`` for a model whose kernels
    run on the CPU only (fbgemm's int8 GEMMs), wherever the ranks run."""
    return {"name": name, "loader": f"{loader.__module__}:{loader.__name__}", "kwargs": kwargs,
            "ffn_sparsity": ffn_sparsity, "cpu": cpu}


def load_job_model(spec: dict):
    import importlib

    module, function = spec["loader"].split(":")
    return getattr(importlib.import_module(module), function)(**spec["kwargs"])


def run_jobs(jobs: list[dict], tokens: np.ndarray, seq_len: int, max_tokens: int, rank: int = 0, world: int = 1,
             device: str | torch.device = "cpu", reference: dict | None = None, prompts: int = PROMPTS,
             new_tokens: int = NEW_TOKENS) -> dict[str, dict]:
    """{job name: perplexity result}, one model loaded at a time. With a ``reference`` job (the
    teacher, held throughout with its outputs, ``TeacherOutputs``: two models at most), each
    result also has the model's fidelity to it: ``kl`` and ``top1_agreement`` on the same windows, and ``greedy_agreement`` over
    ``prompts`` prompts from ``tokens`` (``greedy_agreement``)."""
    results, teacher = {}, None
    if reference:
        model = load_job_model(reference).to(device).eval()
        new_tokens = min(new_tokens, model.config.n_positions - 1)
        prompt_len = max(1, min(32, model.config.n_positions - new_tokens))
        continuations = teacher_continuations(model, tokens, prompts, prompt_len, new_tokens, device, rank, world)
        teacher = TeacherOutputs(model)
    for spec in jobs:
        on = "cpu" if spec.get("cpu") else device
        model = load_job_model(spec).to(on)
        ref = teacher.to(on) if teacher is not None else None
        result = perplexity(model, tokens, seq_len, max_tokens=max_tokens, device=on, desc=spec["name"],
                            ffn_sparsity=spec["ffn_sparsity"], rank=rank, world=world, teacher=ref)
        if ref is not None:
            result["greedy_agreement"] = greedy_agreement(model, continuations, prompts, new_tokens, on, world)
        results[spec["name"]] = result
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # a stage's process gives the GPU back to the training that follows
    return results


def main(argv: list[str] | None = None) -> int:
    """A torchrun rank: ``python -m pipeline.evaluate --job JOB.json --out RESULTS.json``."""
    import argparse
    import json
    from pathlib import Path

    from pipeline import distributed
    from pipeline.data import load_tokens

    p = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description="evaluate jobs on every rank")
    p.add_argument("--job", required=True, type=Path, help="{tokens, seq_len, max_tokens, jobs: [...], reference}")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    plan = json.loads(args.job.read_text())
    rank, world, device = distributed.setup()
    results = run_jobs(plan["jobs"], load_tokens(Path(plan["tokens"])), plan["seq_len"],
                       plan["max_tokens"], rank, world, device, plan.get("reference"))
    if rank == 0:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(args.out)
    distributed.teardown(world)
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    raise SystemExit(record(main)())
