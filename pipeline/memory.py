"""Memory preflight: what one training rank needs, estimated before any weight is loaded.

    python -m pipeline.memory --model gpt-j-full-relu --teacher gpt-j-full --world-size 8 --device-memory-gb 80

Per rank, with P student parameters (fp32 master weights, AdamW):
  weights 4P, gradients 4P, optimizer 8P   (divided by the world size under FSDP)
  + under FSDP, two blocks gathered at a time (prefetch), in the compute dtype
  + activations: per layer about seq * batch * d_model * (34 + 5 * heads * seq / d_model) bytes
    at 16 bits (Korthikanti et al. 2022), twice that in fp32, plus the fp32 logits and their grad
  + the teacher's weights in the compute dtype when distilling (replicated, no gradients).
"""
from __future__ import annotations

import argparse
import dataclasses

from pipeline import cli
from pipeline.cli import UsageError
from pipeline.models.config import GPTJConfig

GB = 1024**3


@dataclasses.dataclass
class Plan:
    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    teacher: float
    available: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations + self.teacher

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.2f}"
                          for name in ("weights", "gradients", "optimizer", "gathered", "activations", "teacher"))
        return f"{self.total / GB:.2f} GiB per rank ({parts}) of {self.available / GB:.2f} GiB available"


def plan(config: GPTJConfig, world_size: int, sharding: str, batch_per_rank: int, seq_len: int,
         compute_bytes: int, available: float, teacher: GPTJConfig | None = None) -> Plan:
    p = config.num_params()
    shard = world_size if sharding == "fsdp" else 1
    d, f = config.n_embd, config.n_inner
    per_layer = 4 * d * d + 2 * d * f + f + 3 * d
    act_layer = seq_len * batch_per_rank * d * (34 + 5 * config.n_head * seq_len / d) * (compute_bytes / 2)
    logits = 3 * 4 * seq_len * batch_per_rank * config.vocab_size
    return Plan(weights=4 * p / shard, gradients=4 * p / shard, optimizer=8 * p / shard,
                gathered=2 * per_layer * compute_bytes if sharding == "fsdp" else 0.0,
                activations=config.n_layer * act_layer + logits,
                teacher=teacher.num_params() * compute_bytes if teacher else 0.0,
                available=available)


def available_memory(device_type: str, local_world_size: int) -> float:
    """Bytes this rank may use: the free memory of its GPU, or its share of the available RAM."""
    if device_type == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 / max(1, local_world_size)


def main(argv: list[str] | None = None) -> int:
    from pipeline.models.presets import resolve_model

    p = argparse.ArgumentParser(prog="python -m pipeline.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--world-size", type=cli.positive_int, default=1)
    p.add_argument("--sharding", choices=("ddp", "fsdp"), default="fsdp")
    p.add_argument("--batch-per-rank", type=cli.positive_int, default=1)
    p.add_argument("--seq-len", type=cli.positive_int, default=2048)
    p.add_argument("--compute-bytes", type=int, choices=(2, 4), default=2, help="2 for bf16/fp16 compute, 4 for fp32")
    p.add_argument("--device-memory-gb", type=cli.positive_float, default=80.0)
    p.add_argument("--teacher", help="a teacher model name: distilling holds it too")
    args = p.parse_args(argv)
    try:
        config, _ = resolve_model(args.model)
        teacher = resolve_model(args.teacher)[0] if args.teacher else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = plan(config, args.world_size, args.sharding, args.batch_per_rank, args.seq_len, args.compute_bytes,
                  args.device_memory_gb * GB, teacher)
    print(f"{args.model} ({config.num_params() / 1e9:.2f}e9 parameters), {args.sharding} over {args.world_size} "
          f"rank(s), batch {args.batch_per_rank} x {args.seq_len} tokens per rank"
          f"{', with a teacher' if teacher else ''}: {result.describe()}")
    return 0 if result.total <= result.available else 1


if __name__ == "__main__":
    cli.run(main)
