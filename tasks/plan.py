"""``python -m tasks.plan [--tflops T] [--device-memory-gb G] [--check] [luigi overrides]`` (``make
plan``): before a run, for every stage of the graph that would run (missing, stale or broken), the
peak memory on the host and per torchrun rank, the disk it writes, its FLOPs and the time they take
at ``--tflops`` per GPU, from the estimates the stages check themselves against when they start
(``Stage.needs``); and which stage does not fit. ``make compress`` runs it with ``--check`` and
stops there when something does not fit."""
from __future__ import annotations

import argparse

from pipeline import cli
from pipeline.cli import UsageError
from pipeline.resources import GB, available_memory, free_disk, human
from tasks.status import current_graph, instance_label, open_store, stage_status

TB = 1e12


def device_memory(flag: float | None, local_ranks: int) -> tuple[float, str]:
    """What one rank may hold: ``--device-memory-gb``, else the free memory of this machine's GPU,
    else its share of the host's available memory."""
    if flag:
        return flag * GB, f"{flag:g} GiB per device (--device-memory-gb)"
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0]), "the free memory of GPU 0"
    return available_memory() / local_ranks, f"1/{local_ranks} of the host's available memory"


def plan_rows(stages, store) -> list[dict]:
    """Each stage that would run, with its estimated needs."""
    specs, rows = [t.spec() for t in stages], []
    for task, spec in zip(stages, specs):
        entry = stage_status(spec, store)
        if entry["state"] != "up-to-date":
            rows.append({"stage": f"{task.stage_name} {instance_label(spec, specs)}".strip(), "state": entry["state"],
                         "needs": task.estimate()})
    return rows


def problems(rows, store, rank_limit: float) -> list[str]:
    """Why a stage would not fit: host memory, memory per rank, or the disk of the stages up to it."""
    found, disk, overflowed = [], 0.0, False
    host, free = available_memory(), free_disk(store.root)
    for row in rows:
        needs, name = row["needs"], row["stage"]
        disk += needs.disk
        if needs.memory > host:
            found.append(f"{name} needs {human(needs.memory)} of host memory; {human(host)} is available")
        if needs.rank_memory > rank_limit:
            found.append(f"{name} needs {human(needs.rank_memory)} per rank; a rank has {human(rank_limit)} "
                         f"(use more ranks, or budgets that hold less)")
        if disk > free and not overflowed:  # named once: the first stage that overflows
            overflowed = True
            found.append(f"{name}: the stages up to it write {human(disk)} into {store.root}, and {human(free)} is free")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--tflops", type=cli.positive_float, default=100.0,
                   help="the throughput each GPU sustains on this model, in TFLOP/s (for the times)")
    p.add_argument("--device-memory-gb", type=cli.positive_float, help="memory per device (default: measured)")
    p.add_argument("--target", action="append", default=[], help="a stage to plan for (default: the whole graph)")
    p.add_argument("--check", action="store_true", help="exit 1 when a stage does not fit")
    args, overrides = p.parse_known_args(argv)
    from tasks.stage import pipeline_settings

    store = open_store()
    try:
        with current_graph(overrides, tuple(args.target)) as stages:
            settings = pipeline_settings()
            world = settings.world_size()
            rows = plan_rows(stages, store)
            limit, limit_what = device_memory(args.device_memory_gb, settings.nproc_per_node)
            found = problems(rows, store, limit)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"plan: {len(rows)} stage(s) to run on {world} rank(s) at {args.tflops:g} TFLOP/s per GPU; "
          f"a rank has {human(limit)} ({limit_what})")
    print(f"{'stage':<52} {'state':<8} {'host mem':>11} {'per rank':>11} {'disk':>11} {'FLOPs':>10} {'time':>9}")
    total_time = 0.0
    for row in rows:
        needs = row["needs"]
        seconds = needs.flops / (args.tflops * TB * world)
        total_time += seconds
        print(f"{row['stage']:<52} {row['state']:<8} {human(needs.memory):>11} "
              f"{human(needs.rank_memory) if needs.rank_memory else '-':>11} {human(needs.disk):>11} "
              f"{needs.flops:>10.3g} {_duration(seconds):>9}")
    print(f"total: {human(sum(r['needs'].disk for r in rows))} written, {_duration(total_time)} of model work")
    for problem in found:
        print(f"does not fit: {problem}")
    return 1 if found and args.check else 0


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


if __name__ == "__main__":
    cli.run(main)
