"""The training entry point, run under torchrun:

    torchrun --nproc_per_node=N -m pipeline.train --save-dir DIR --model gpt-j-tiny --data DIR ...

One process per device; gloo on CPU, nccl on GPU; DDP across ranks. Every ``--save-interval``
steps rank 0 writes model, optimizer, step and loss log to ``<save-dir>/resume/``; started again
with the same arguments, it continues from there and ends where an uninterrupted run would
(batches depend only on seed, step and rank).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import load_tokens
from pipeline.models import GPTJ, from_pretrained, get_preset, save_pretrained

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", required=True, type=Path, help="where the trained model and resume state go")
    p.add_argument("--model", required=True, help="model preset name (ignored for the architecture when --load is given)")
    p.add_argument("--load", type=Path, help="initial weights: a Hugging Face GPT-J directory or a model artifact")
    p.add_argument("--data", required=True, type=Path, help="a Corpus artifact directory holding train.npy")
    p.add_argument("--start-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save-interval", type=int, default=50)
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a crash
    return p


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_at(tokens: np.ndarray, step: int, rank: int, micro: int, n: int, seq_len: int, seed: int):
    """The ``micro``-th micro-batch of ``n`` sequences for ``rank`` at ``step``: a pure function of
    its arguments, which is what makes resuming exact."""
    rng = np.random.default_rng([seed, step, rank, micro])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=n)
    chunk = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    chunk = torch.from_numpy(chunk)
    return chunk[:, :-1], chunk[:, 1:]


def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def save_checkpoint(path: Path, model, optimizer, step: int, log: list) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log}, tmp)
    os.replace(tmp, path / CHECKPOINT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world, device = setup_distributed()
    per_rank, rem = divmod(args.batch_size, world * args.grad_accum)
    if per_rank == 0 or rem:
        raise SystemExit(f"--batch-size {args.batch_size} must be a positive multiple of "
                         f"world size {world} x --grad-accum {args.grad_accum}")
    torch.manual_seed(args.seed)
    model = from_pretrained(args.load) if args.load else GPTJ(get_preset(args.model))
    model.to(device).train()
    tokens = load_tokens(args.data / "train.npy")
    if len(tokens) <= args.seq_len + 1:
        raise SystemExit(f"{args.data / 'train.npy'} holds {len(tokens)} tokens, fewer than --seq-len {args.seq_len} + 2")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.start_lr, betas=(0.9, 0.95))
    resume = args.save_dir / "resume"
    step, log = 0, []
    if (resume / CHECKPOINT).is_file():
        state = torch.load(resume / CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
        if rank == 0:
            print(f"resuming from step {step} ({resume / CHECKPOINT})", flush=True)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=rank != 0, file=sys.stdout,
               mininterval=0.5 if sys.stdout.isatty() else 30)
    while step < args.steps:
        lr = lr_at(step, args.start_lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = batch_at(tokens, step, rank, micro, per_rank, args.seq_len, args.seed)
            x, y = x.to(device), y.to(device)
            logits = net(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()) / args.grad_accum
            loss.backward()
            total += loss.detach()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        step += 1
        log.append([step, round(total.item(), 6)])
        bar.update(1)
        if rank == 0 and (step % args.log_interval == 0 or step == args.steps):
            bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")
            print(f"step {step} loss {total.item():.4f} lr {lr:.3e}", flush=True)
        if rank == 0 and args.save_interval and step % args.save_interval == 0 and step < args.steps:
            save_checkpoint(resume, model, optimizer, step, log)
        if args.stop_after and step >= args.stop_after:
            break
    bar.close()
    if rank == 0 and step == args.steps:
        save_pretrained(model, args.save_dir)
        tokens_seen = args.steps * args.batch_size * args.seq_len
        (args.save_dir / TRAIN_LOG).write_text(json.dumps(
            {"loss": log, "tokens_seen": tokens_seen, "world_size": world,
             "wall_time_s": round(time.time() - start, 2)}) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def torchrun_command(args: list[str], nproc_per_node: int = 1, nnodes: int = 1, rdzv_endpoint: str = "",
                     rdzv_id: str = "pipeline") -> list[str]:
    """The command that runs this entry point under torchrun (the interpreter's own torch.distributed.run)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and not rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_id}"]
    return cmd + ["-m", "pipeline.train", *args]


if __name__ == "__main__":
    sys.exit(main())
