"""Hidden-state dump, run under torchrun: the input of every layer's ``fc_in`` for a token budget,
written to HDF5 as it is computed.

    torchrun --nproc_per_node=N -m pipeline.moefication.hidden --model DIR --data CORPUS --out DIR

Each rank writes its windows as a series of shards (``shard-<rank>-<part>.h5`` of about
``--part-tokens`` tokens each: one fp16 dataset per layer, chunked by rows, plus a ``heldout``
flag per token) while they stream through the model, so memory stays bounded by one batch
whatever the budget; rank 0 then joins the shards into ``hidden_states.h5`` through HDF5
virtual datasets (no copy). A shard is written under a temporary name and renamed when
complete; a restarted dump skips the complete shards, so a crash costs at most one shard per
rank. Shard boundaries fall on batch boundaries, so the values do not depend on them. The last ``heldout_fraction`` of the tokens come from
the corpus' valid split and are flagged for evaluation.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import cli, distributed
from pipeline.data import budget_split, load_tokens
from pipeline.evaluate import windows
from pipeline.models import from_pretrained
from pipeline.models.config import checkpoint_config
from pipeline.moefication.files import HIDDEN

CHUNK_ROWS = 1024


def layer_name(i: int) -> str:
    return f"layer_{i:03d}"


def plan_windows(corpus: Path, seq_len: int, token_budget: int, heldout_fraction: float):
    """(windows (n, seq_len) int64, heldout flag per window): training windows then held-out ones."""
    train, valid = load_tokens(corpus / "train.npy"), load_tokens(corpus / "valid.npy")
    n_heldout = budget_split(token_budget, heldout_fraction, {"train": len(train), "valid": len(valid)})["valid"]
    parts = [windows(train, seq_len, token_budget - n_heldout)[:, :-1]]
    flags = [np.zeros(len(parts[0]), dtype=bool)]
    if n_heldout:
        parts.append(windows(valid, seq_len, n_heldout)[:, :-1])
        flags.append(np.ones(len(parts[1]), dtype=bool))
    return np.concatenate(parts), np.concatenate(flags)


def write_shard(model, shard: Path, wins: np.ndarray, flags: np.ndarray, batch_size: int, desc: str) -> None:
    """Stream the windows through the model, writing every layer's fc_in input as it comes."""
    d_model, seq_len = model.config.n_embd, wins.shape[1]
    n = len(wins) * seq_len
    tmp = shard.with_suffix(".partial")
    captured: list[torch.Tensor] = []
    hooks = [block.mlp.fc_in.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
             for block in model.transformer.h]
    try:
        with h5py.File(tmp, "w") as f, torch.no_grad():
            sets = [f.create_dataset(layer_name(i), shape=(n, d_model), dtype="f2",
                                     chunks=(min(CHUNK_ROWS, n), d_model) if n else None, track_times=False)
                    for i in range(len(model.transformer.h))]
            f.create_dataset("heldout", data=np.repeat(flags, seq_len), track_times=False)
            row = 0
            for start in tqdm(range(0, len(wins), batch_size), desc=desc, unit="batch", leave=False):
                batch = torch.from_numpy(wins[start:start + batch_size])
                captured.clear()
                model(batch)
                rows = batch.numel()
                for dataset, x in zip(sets, captured):
                    dataset[row:row + rows] = x.reshape(rows, d_model).half().numpy()
                row += rows
            f.attrs["complete"] = True
    finally:
        for h in hooks:
            h.remove()
    os.replace(tmp, shard)


def shard_name(rank: int, part: int) -> str:
    return f"shard-{rank}-{part:04d}.h5"


def rank_parts(n_windows: int, world: int, batch_size: int, part_windows: int) -> list[tuple[int, int, np.ndarray]]:
    """(rank, part, window indices) in the order the joined file holds them: each rank's
    contiguous share of the windows, cut into parts of whole batches."""
    per_part = max(batch_size, part_windows // batch_size * batch_size)
    out = []
    for rank, mine in enumerate(np.array_split(np.arange(n_windows), world)):
        for part, start in enumerate(range(0, max(len(mine), 1), per_part)):
            out.append((rank, part, mine[start:start + per_part]))
    return out


def shard_complete(shard: Path) -> bool:
    try:
        with h5py.File(shard, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


def _virtual_dataset(f: h5py.File, name: str, layout: h5py.VirtualLayout) -> None:
    """``f.create_virtual_dataset`` without the creation time in its header (HDF5 records one by
    default), so that a rebuilt dump is identical byte for byte."""
    dcpl = layout._get_dcpl(f.filename)
    dcpl.set_obj_track_times(False)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(np.dtype(layout.dtype), logical=1),
                    h5py.h5s.create_simple(layout.shape), dcpl=dcpl)


def join_shards(out: Path, shards: list[Path], n_layers: int, d_model: int) -> None:
    """``hidden_states.h5``: per layer a virtual dataset over the shards (relative paths, so the
    directory can move), and the joined heldout flags."""
    sizes = []
    for s in shards:
        with h5py.File(s, "r") as f:
            sizes.append(f[layer_name(0)].shape[0])
    total = sum(sizes)
    with h5py.File(out, "w", libver="latest") as f:
        for i in range(n_layers):
            layout = h5py.VirtualLayout(shape=(total, d_model), dtype="f2")
            row = 0
            for shard, size in zip(shards, sizes):
                layout[row:row + size] = h5py.VirtualSource(shard.name, layer_name(i), shape=(size, d_model))
                row += size
            _virtual_dataset(f, layer_name(i), layout)
        flags = []
        for s in shards:
            with h5py.File(s, "r") as src:
                flags.append(src["heldout"][:])
        f.create_dataset("heldout", data=np.concatenate(flags), track_times=False)
        f.attrs.update({"tokens": total, "layers": n_layers, "d_model": d_model})


def check_hidden_states(f: h5py.File, path: Path, num_layer: int, d_model: int) -> None:
    """One sentence when the hidden-state file does not belong to a model of this shape."""
    for i in range(num_layer):
        if layer_name(i) not in f:
            raise ValueError(f"hidden-state file {path} has no dataset {layer_name(i)}: it holds "
                             f"{len([k for k in f if k.startswith('layer_')])} layers, the model {num_layer}")
        ds = f[layer_name(i)]
        if ds.ndim != 2 or ds.shape[1] != d_model or ds.dtype not in (np.float16, np.float32):
            raise ValueError(f"hidden-state file {path}: {layer_name(i)} is {ds.dtype} of shape {ds.shape}, "
                             f"expected float16 or float32 rows of width {d_model} (the model's d_model)")
    if "heldout" not in f or f["heldout"].shape != (f[layer_name(0)].shape[0],):
        raise ValueError(f"hidden-state file {path} has no heldout flag per token")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.moefication.hidden", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=cli.existing_dir, help="the ReLU model directory")
    p.add_argument("--data", required=True, type=cli.existing_dir, help="a Corpus artifact directory")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--token-budget", type=cli.positive_int, default=65536)
    p.add_argument("--heldout-fraction", type=float, default=0.1)
    p.add_argument("--seq-len", type=cli.positive_int, default=128)
    p.add_argument("--batch-size", type=cli.positive_int, default=8)
    p.add_argument("--part-tokens", type=cli.positive_int, default=16384, help="tokens per shard: what a crash can cost at most")
    args = p.parse_args(argv)
    try:
        if not (args.data / "train.npy").is_file():
            raise ValueError(f"--data {args.data} holds no train.npy (expected a Corpus artifact directory)")
        wins, flags = plan_windows(args.data, args.seq_len, args.token_budget, args.heldout_fraction)
        checkpoint_config(args.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    rank, world, _ = distributed.setup(cpu_only=True)
    model = from_pretrained(args.model).eval()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = rank_parts(len(wins), world, args.batch_size, max(1, args.part_tokens // args.seq_len))
    skipped = 0
    for r, part, index in parts:
        if r != rank:
            continue
        shard = args.out / shard_name(r, part)
        if shard_complete(shard):
            skipped += 1
            continue
        write_shard(model, shard, wins[index], flags[index], args.batch_size,
                    f"hidden states (rank {rank}, shard {part + 1}/{sum(p[0] == rank for p in parts)})")
    if skipped:
        print(f"rank {rank}: {skipped} complete shard(s) kept from an earlier run, not recomputed", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        join_shards(args.out / HIDDEN, [args.out / shard_name(r, part) for r, part, _ in parts],
                    model.config.n_layer, model.config.n_embd)
    del model
    distributed.teardown(world)
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())  # record: a failing rank's traceback reaches torchrun's summary
