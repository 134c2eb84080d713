"""The training entry point, run under torchrun, with the seed's flags:

    torchrun --nproc_per_node=N -m pipeline.train --save-dir DIR --model gpt-j-full-relu \\
        --start-lr 1e-4 --load gpt-j.bin --use-kd --kd-mse-last-hidden --kd-loss-scale 1 \\
        --load-teacher gpt-j.bin --data CORPUS_DIR

One process per device; gloo on CPU, nccl on GPU; DDP, or FSDP2 (``fully_shard``) for models
whose replicated training state does not fit (``--sharding auto`` decides from the memory plan).
Every ``--save-interval`` steps rank 0 writes model, optimizer, step, loss log and RNG state to
``<save-dir>/resume/``; started again with the same arguments it continues from there and ends
where an uninterrupted run would (batches depend only on seed, step, rank and micro-batch).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import cli, distributed, memory, methods, precision
from pipeline.cli import UsageError
from pipeline.data import load_tokens
from pipeline.models import GPTJ, GPTJConfig, presets, save_pretrained
from pipeline.models.gptj import lm_forward
from pipeline.models.hf import read_weights

CHECKPOINT = "checkpoint.json"  # in <save-dir>/resume/: the step, the loss log, and the shards' directory
TRAIN_LOG = "train_log.json"
LATER = {"save_hidden": "the HiddenStates stage (python -m pipeline.moefication.hidden)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--save-dir", required=True, type=Path, help="where the trained model and resume state go")
    p.add_argument("--model", required=True,
                   help="gpt-j-full[-relu][-int8] (28 layers), gpt-j[-int8] (14 layers), or a preset "
                        "(gpt-j-tiny, gpt-j-smoke) with optional -relu / -int8")
    p.add_argument("--load", type=Path, help="initial weights: a model directory, .safetensors, or a weights-only .bin/.pt")
    p.add_argument("--data", type=Path, help="a Corpus artifact directory holding train.npy")
    p.add_argument("--start-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--save-interval", type=int, default=50)
    p.add_argument("--sharding", choices=("auto", "ddp", "fsdp"), default="auto")
    p.add_argument("--precision", choices=precision.CHOICES, default="auto",
                   help="compute precision (autocast; fp32 master weights); auto: bf16 on GPU and on a CPU with "
                        "native bf16 (AVX512-BF16, AMX), else fp32 (fp16 adds loss scaling)")
    p.add_argument("--memory-limit-gb", type=float, help="memory per rank to plan against (default: what is free)")
    # knowledge distillation (BMDistill)
    p.add_argument("--use-kd", action="store_true")
    p.add_argument("--load-teacher", type=Path)
    p.add_argument("--teacher-model", help="teacher architecture when --load-teacher has no config.json (default: the student's without -relu/-int8, full depth)")
    p.add_argument("--kd-loss-scale", type=float, default=1.0)
    p.add_argument("--kd-temp", type=float, default=1.0)
    p.add_argument("--kd-ce-logits", type=float, default=0.0)
    p.add_argument("--kd-mse-last-hidden", nargs="?", type=float, const=1.0, default=0.0)
    p.add_argument("--kd-mse-hidden", type=float, default=0.0)
    p.add_argument("--kd-mse-att", type=float, default=0.0)
    p.add_argument("--kd-mse-emb", type=float, default=0.0)
    p.add_argument("--act-l1", type=float, default=0.0,
                   help="L1 penalty on the FFN activations (mean over layers), which raises ReLU sparsity")
    p.add_argument("--int8-grad", choices=("float", "int8"), default="float",
                   help="-int8 models' backward: straight-through in float, or cpm_kernels' int8 gradients")
    # 2:4 pruning (BMPrune)
    p.add_argument("--use-pruning", action="store_true", help="train with 2:4 masks held on the FFN and attention weights")
    p.add_argument("--prune-func", default="m4n2_2d_greedy", help="m4n2_1d, m4n2_2d_greedy or m4n2_2d_best")
    p.add_argument("--pruning-mask", type=Path,
                   help="mask checkpoint: loaded when it exists, else computed and saved (default: SAVE_DIR/pruning_masks.safetensors)")
    # MoE routing active (BMMoE)
    p.add_argument("--moe", type=Path,
                   help="a Routers artifact directory (clusters and routers): train with every FFN computing only "
                        "the top-k experts its frozen router picks (needs a -relu model)")
    p.add_argument("--moe-topk", type=int, help="experts per token with --moe")
    # a flag of the seed whose feature is a stage of its own here
    p.add_argument("--save-hidden", action="store_true")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate a crash
    return p


def is_student_of(student: GPTJConfig, teacher: GPTJConfig) -> bool:
    """Whether ``student`` is a shallower copy of ``teacher``'s shape (initialised by BMDistill.init_student)."""
    return (teacher.n_layer > student.n_layer and teacher.n_layer % student.n_layer == 0
            and student.replace(n_layer=teacher.n_layer, activation=teacher.activation) == teacher)


def build_model(config: GPTJConfig, state: dict | None, what: str, path: Path | None) -> GPTJ:
    model = GPTJ(config)
    if state is None:
        return model
    n_layers = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")), default=-1)
    if n_layers > config.n_layer and n_layers % config.n_layer == 0:
        methods.use("distill").BMDistill.init_student(model, state)  # the seed's 14-layer gpt-j from the 28-layer weights
        return model
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state:
            raise UsageError(f"{what} {path} has no tensor '{key}': it is not a {config.n_layer}-layer GPT-J "
                             f"of width {config.n_embd} (wrong architecture for this --model)")
        if state[key].shape != tensor.shape:
            raise UsageError(f"{what} {path}: tensor '{key}' has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(tensor.shape)} for this --model (wrong architecture)")
    extra = sorted(set(state) - set(expected) - {k for k in state if k.endswith(("attn.bias", "attn.masked_bias"))})
    if extra:
        raise UsageError(f"{what} {path} has tensor '{extra[0]}', which this --model does not (wrong architecture)")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)
    return model


def activation_penalty(model) -> list:
    """Collects, on every forward, the mean activation of each FFN (after ReLU, the L1 norm)."""
    collected: list = []
    for block in model.transformer.h:
        block.mlp.fc_in.register_forward_hook(lambda m, i, out: collected.append(torch.relu(out).float().mean()))
    return collected


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_at(tokens: np.ndarray, step: int, part: int, n: int, seq_len: int, seed: int):
    """Part ``part`` (of ``n`` sequences) of the global batch of ``step``: the global batch is one
    seeded draw per step, cut into parts by rank and micro-batch (part = rank * grad_accum +
    micro), so any world size and accumulation see the same sequences, and resuming is exact."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=(part + 1) * n)[part * n:]
    chunk = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]


def resolve_model(name: str) -> tuple[GPTJConfig, bool]:
    try:
        return presets.resolve_model(name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_args(args, world: int) -> None:
    for flag, feature in LATER.items():
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} arrives with {feature}, which this version does not have yet")
    if args.data is None:
        raise UsageError("--data is required: a Corpus artifact directory holding train.npy")
    if not (args.data / "train.npy").is_file():
        raise UsageError(f"--data {args.data} holds no train.npy (expected a Corpus artifact directory)")
    if args.batch_size <= 0 or args.batch_size % (world * args.grad_accum):
        raise UsageError(f"--batch-size {args.batch_size} must be a positive multiple of the world size {world} "
                         f"times --grad-accum {args.grad_accum}")
    if args.use_kd and args.load_teacher is None:
        raise UsageError("--use-kd needs --load-teacher (the teacher's weights)")
    if args.moe is not None and args.moe_topk is None:
        raise UsageError("--moe needs --moe-topk (how many experts each token uses)")
    if args.use_pruning:
        try:
            methods.use("prune").get_mask_function(args.prune_func)
        except ValueError as e:
            raise UsageError(f"--prune-func: {e}") from None


def distill_config(args):
    return methods.use("distill").DistillConfig(ce_logits=args.kd_ce_logits, temp=args.kd_temp, mse_last_hidden=args.kd_mse_last_hidden,
                         mse_hidden=args.kd_mse_hidden, mse_att=args.kd_mse_att, mse_emb=args.kd_mse_emb,
                         loss_scale=args.kd_loss_scale)


def teacher_config(args, teacher_file_config: GPTJConfig | None) -> GPTJConfig:
    if teacher_file_config is not None:
        return teacher_file_config
    if args.teacher_model:
        return resolve_model(args.teacher_model)[0]
    name = args.model.removesuffix("-int8").removesuffix("-relu")
    return resolve_model("gpt-j-full" if name == "gpt-j" else name)[0]


def compute_dtype(args, device) -> torch.dtype:
    return precision.DTYPES[precision.resolve(args.precision, device.type)]


def choose_sharding(args, config, world, device, teacher_cfg, per_rank, dtype) -> tuple[str, memory.Plan]:
    available = (args.memory_limit_gb * memory.GB if args.memory_limit_gb
                 else memory.available_memory(device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    nbytes = torch.finfo(dtype).bits // 8
    options = [args.sharding] if args.sharding != "auto" else (["ddp", "fsdp"] if world > 1 else ["ddp"])
    for sharding in options:
        p = memory.plan(config, world, sharding, per_rank, args.seq_len, nbytes, available, teacher_cfg)
        if p.total <= p.available:
            return sharding, p
    raise UsageError(f"{args.model} does not fit: {options[-1]} over {world} rank(s) needs {p.describe()}; "
                     f"use more ranks, --sharding fsdp, a smaller --batch-size or more --grad-accum")


def wrap(model, sharding: str, world: int, device, dtype):
    if world == 1:
        return model
    if sharding == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def full_state(model, optimizer, sharding: str, world: int) -> tuple[dict, dict]:
    """Model and optimizer state gathered in full (for rank 0 to save)."""
    if sharding == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def as_trained(path: str, moe_topk: int | None = None, int8: bool = False):
    """A trained model as it ran in training: its routed FFNs (the routers beside it) and QAT's
    int8 products (an evaluation job's loader)."""
    from pipeline.models import from_pretrained

    model = from_pretrained(path)
    if moe_topk is not None:
        methods.use("moe").route_experts(model, Path(path), moe_topk)
    if int8:
        methods.use("quant").BMQuant.quantize(model)
    return model.eval()


class NonFiniteTraining(UsageError):
    """A training step whose loss or gradient norm is NaN or infinite: the run stops before the update."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 1


def check_finite(step: int, loss: float, grad_norm: float | None, resume: Path) -> None:
    """Stop the run, on every rank alike, before a non-finite loss or gradient norm reaches the weights."""
    what = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm) \
        if grad_norm is not None and not math.isfinite(grad_norm) else None
    if what is None:
        return
    saved = sorted(resume.glob("step-*"))
    kept = f"the last resume point, {saved[-1]}, is kept" if saved else "no resume point was saved before it"
    raise NonFiniteTraining(
        f"training stopped at step {step}: its {what[0]} is {what[1]}, not a finite number, so the weights were "
        f"not updated and {kept}; try a lower start_lr or a longer warmup, precision fp32, or check the input "
        f"weights and data for NaN or infinite values")


def save_checkpoint(resume: Path, trained, optimizer, step: int, log: list, rank: int) -> None:
    """A resumable checkpoint with torch.distributed.checkpoint: each rank writes its own shard of
    the model and optimizer state (under FSDP2 no rank gathers them), into ``step-<n>/``; rank 0
    then points ``checkpoint.json`` at it, atomically, and removes the previous one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(trained, optimizer)
    target = resume / f"step-{step:07d}"
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=target, no_dist=not dist.is_initialized())
    if rank == 0:  # dcp.save returns on every rank once the checkpoint's metadata is written
        rng = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
        tmp = resume / (CHECKPOINT + ".tmp")
        tmp.write_text(json.dumps({"dir": target.name, "step": step, "log": log, "torch_rng": rng}))
        os.replace(tmp, resume / CHECKPOINT)
        for old in resume.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(resume: Path, trained, optimizer) -> tuple[int, list]:
    """Every rank reads its shard of the checkpoint ``checkpoint.json`` points at; (step, log)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    pointer = json.loads((resume / CHECKPOINT).read_text())
    model_state, optim_state = get_state_dict(trained, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=resume / pointer["dir"], no_dist=not dist.is_initialized())
    set_state_dict(trained, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng = np.frombuffer(base64.b64decode(pointer["torch_rng"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(rng))
    return pointer["step"], pointer["log"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world_hint = int(os.environ.get("WORLD_SIZE", "1"))
    check_args(args, world_hint)
    config, int8 = resolve_model(args.model)
    student_state, student_file_config = read_weights(args.load, "--load") if args.load else (None, None)
    if student_file_config is not None and not is_student_of(config, student_file_config):
        # a model directory brings its own architecture; --model then names only the variant
        config = student_file_config.replace(activation=config.activation)
    teacher_state = teacher_cfg = None
    if args.use_kd:
        teacher_state, teacher_file_config = read_weights(args.load_teacher, "--load-teacher")
        teacher_cfg = teacher_config(args, teacher_file_config)
        if teacher_cfg.vocab_size != config.vocab_size:
            raise UsageError(f"the teacher's vocabulary ({teacher_cfg.vocab_size} tokens) differs from the "
                             f"student's ({config.vocab_size}); distillation needs the same tokenizer")

    rank, world, device = distributed.setup()
    weights = {"student": student_state, "teacher": teacher_state}
    del student_state, teacher_state  # run drops them once its models hold the values
    run(args, config, int8, weights, teacher_cfg, rank, world, device)
    distributed.teardown(world)
    return 0


def run(args, config: GPTJConfig, int8: bool, weights: dict, teacher_cfg, rank: int, world: int, device) -> None:
    """This rank's part, between joining the process group and leaving it: build, train (resuming
    from ``<save-dir>/resume/``), save. What it builds is freed when it returns."""
    dtype = compute_dtype(args, device)
    per_rank = args.batch_size // (world * args.grad_accum)
    sharding, plan = choose_sharding(args, config, world, device, teacher_cfg, per_rank, dtype)
    if rank == 0:
        print(f"memory plan ({sharding}, {dtype}): {plan.describe()}", flush=True)

    torch.manual_seed(args.seed)
    model = build_model(config, weights.pop("student"), "--load", args.load).to(device).train()
    prune = methods.use("prune") if args.use_pruning else None
    if prune:  # every rank computes (or loads) the same masks; rank 0 writes them
        mask_path = args.pruning_mask or args.save_dir / prune.PRUNING_MASKS
        try:
            prune.BMPrune.compute_mask(model, args.prune_func, checkpoint=mask_path if rank == 0 or mask_path.exists() else None)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.moe is not None:
        try:
            methods.use("moe").route_experts(model, args.moe, args.moe_topk)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--moe: {e}") from None
    if int8:
        methods.use("quant").BMQuant.quantize(model, grad=args.int8_grad)
    extra_params: list = []
    if args.use_kd:
        teacher = build_model(teacher_cfg, weights.pop("teacher"), "--load-teacher", args.load_teacher).to(device, dtype)
        distill = methods.use("distill")
        distiller = distill.BMDistill.set_forward(model, teacher, lm_forward, distill_config(args)).to(device)
        extra_params = list(distiller.project.parameters())
    tokens = load_tokens(args.data / "train.npy")
    if len(tokens) <= args.seq_len + 1:
        raise UsageError(f"{args.data / 'train.npy'} holds {len(tokens)} tokens, fewer than --seq-len {args.seq_len} + 2")

    penalties = activation_penalty(model) if args.act_l1 else None
    net = wrap(model, sharding, world, device, dtype)
    if args.use_kd:
        distiller.model = net
        forward = distiller
    else:
        def forward(x, y):
            loss, _ = lm_forward(net, x, y)
            return loss, {"lm": loss.detach()}
    decay = [p for p in model.parameters() if p.dim() >= 2] + extra_params
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.start_lr, betas=(0.9, 0.95))
    if prune:
        prune.BMPrune.set_optim_for_pruning(optimizer, model)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 and sharding != "fsdp"
                else contextlib.nullcontext())

    resume = args.save_dir / "resume"
    resume.mkdir(parents=True, exist_ok=True)
    # what the optimizer trains: the student, and the projection that bridges widths when distilling
    trained = torch.nn.ModuleDict({"student": model, "project": distiller.project}) if extra_params else model
    step, log = 0, []
    if (resume / CHECKPOINT).is_file():
        step, log = load_checkpoint(resume, trained, optimizer)
        if rank == 0:
            print(f"resuming from step {step} ({resume / CHECKPOINT})", flush=True)

    start, first_step = time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=rank != 0, file=sys.stdout,
               mininterval=0.5 if sys.stdout.isatty() else 30)
    while step < args.steps:
        lr = lr_at(step, args.start_lr, args.warmup, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total, parts = torch.zeros((), device=device), {}
        for micro in range(args.grad_accum):
            x, y = batch_at(tokens, step, rank * args.grad_accum + micro, per_rank, args.seq_len, args.seed)
            with autocast:
                loss, terms = forward(x.to(device), y.to(device))
                if penalties is not None:
                    terms["act_l1"] = torch.stack(penalties).mean()
                    loss = loss + args.act_l1 * terms["act_l1"]
                    penalties.clear()
            scaler.scale(loss / args.grad_accum).backward()
            total += loss.detach() / args.grad_accum
            for name, value in terms.items():  # each term unscaled, as the plots compare them
                parts[name] = parts.get(name, 0.0) + value.detach().float() / args.grad_accum
        scaler.unscale_(optimizer)
        # max_norm inf: the norm without clipping (the gradients multiplied by exactly 1)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
        summed = torch.stack([total.float(), *parts.values()])
        if world > 1:
            dist.all_reduce(summed)
            summed /= world
        # fp16's loss scaler skips a step whose gradients overflowed; anywhere else it is fatal
        check_finite(step + 1, summed[0].item(), None if scaler.is_enabled() else norm.item(), resume)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        total, values = summed[0], summed[1:].tolist()
        log.append([step, round(total.item(), 6), {n: round(v, 6) for n, v in zip(parts, values)}])
        bar.update(1)
        if rank == 0 and (step % args.log_interval == 0 or step == args.steps):
            bar.set_postfix(loss=f"{total.item():.4f}", lr=f"{lr:.2e}")
            print(f"step {step} loss {total.item():.4f} lr {lr:.3e}", flush=True)
        if args.save_interval and step % args.save_interval == 0 and step < args.steps:
            save_checkpoint(resume, trained, optimizer, step, log, rank)
        if args.stop_after and step >= args.stop_after:
            break
    bar.close()
    if step == args.steps:
        optimizer.state.clear()  # AdamW's moments go before the final copy is made
        model_state, _ = full_state(model, optimizer, sharding, world)
        if rank == 0:
            final = GPTJ(config)
            final.load_state_dict(model_state)
            save_pretrained(final, args.save_dir)
            (args.save_dir / TRAIN_LOG).write_text(json.dumps(
                {"loss": log, "tokens_seen": args.steps * args.batch_size * args.seq_len, "world_size": world,
                 "sharding": sharding, "precision": str(dtype).removeprefix("torch."),
                 "wall_time_s": round(time.time() - start, 2),
                 "tokens_this_run": (args.steps - first_step) * args.batch_size * args.seq_len}) + "\n")


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    cli.run(record(main))  # record: a failing rank's traceback reaches torchrun's summary
