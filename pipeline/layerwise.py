"""A torchrun rank's share of a stage's layer-by-layer work (clustering, router training):
``python -m pipeline.layerwise --job JOB.json --out DONE.json``.

JOB names the function (``"module:function"``, one the stage's own code imports, so that its
version covers it), the number of layers and the function's keyword arguments. Rank r of w calls
it with ``layers=range(r, num_layer, w)`` and its own device; the function keeps each finished
layer in the stage's per-layer progress (``pipeline.resume``), from which the stage's process
assembles the result. Rank 0 writes DONE once every rank has finished.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from pipeline import distributed

    p = argparse.ArgumentParser(prog="python -m pipeline.layerwise", description=__doc__.split("\n\n")[0])
    p.add_argument("--job", required=True, type=Path, help="{function, num_layer, kwargs}")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    job = json.loads(args.job.read_text())
    rank, world, device = distributed.setup()
    module, name = job["function"].split(":")
    layers = list(range(rank, job["num_layer"], world))
    getattr(importlib.import_module(module), name)(**job["kwargs"], layers=layers, device=device)
    if world > 1:
        dist.barrier()
    if rank == 0:
        args.out.write_text(json.dumps({"layers": job["num_layer"], "world": world}))
    distributed.teardown(world)
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    raise SystemExit(record(main)())
