"""Disk and memory preflight: what a stage will write and hold, checked before it starts.

Each stage estimates an upper bound from its parameters and the model's shape (see the
``needs`` method of each stage); the check compares it with the free space of the artifact
store's filesystem and with the memory available, and refuses with the numbers. On a shared
machine, ``PIPELINE_DISK_LIMIT_GB`` and ``PIPELINE_MEMORY_LIMIT_GB`` cap what the pipeline
counts as free.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

GB = 1024**3
DISK_LIMIT_ENV = "PIPELINE_DISK_LIMIT_GB"
MEMORY_LIMIT_ENV = "PIPELINE_MEMORY_LIMIT_GB"


class NotEnoughResources(RuntimeError):
    pass


@dataclasses.dataclass
class Needs:
    disk: float = 0.0  # bytes the stage writes into the store (scratch and resume state included)
    memory: float = 0.0  # bytes of host memory it holds at its peak
    what: str = ""  # how the figures were made, for the refusal message
    flops: float = 0.0  # floating-point operations of its model work (training, evaluation, dumps)
    rank_memory: float = 0.0  # bytes each torchrun rank holds at its peak (0: the stage runs no ranks)
    process: float = 0.0  # bytes of the stage's own process before its work (0: PROCESS_BYTES)

    def as_metrics(self) -> dict:
        return {"estimated_disk_bytes": int(self.disk), "estimated_memory_bytes": int(self.memory),
                "estimated_flops": float(self.flops), "estimated_rank_memory_bytes": int(self.rank_memory)}


TEACHER_CACHE_BYTES = 2 << 30  # an evaluation keeps up to this much of the teacher's outputs (pipeline.evaluate)
PROCESS_BYTES = 256 * 1024**2  # the interpreter and its libraries, in every process a stage starts
# the interpreter with Luigi, numpy and tokenizers but no torch: the process of a stage that runs
# before any other (the Corpus) and imports no torch
PYTHON_BYTES = 96 * 1024**2


def _limit(env: str) -> float | None:
    raw = os.environ.get(env)
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise NotEnoughResources(f"{env} is {raw!r}, expected a number of GiB") from None
    if not value >= 0:  # negative, or NaN
        raise NotEnoughResources(f"{env} is {raw!r}, expected a number of GiB, not negative")
    return value * GB


def free_disk(path: Path) -> float:
    path = Path(path)
    while not path.exists():
        path = path.parent
    free = float(shutil.disk_usage(path).free)
    limit = _limit(DISK_LIMIT_ENV)
    return free if limit is None else min(free, limit)


def available_memory() -> float:
    """Host memory available to new allocations (MemAvailable), capped by PIPELINE_MEMORY_LIMIT_GB."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    free = float(int(info["MemAvailable"].split()[0]) * 1024)
    limit = _limit(MEMORY_LIMIT_ENV)
    return free if limit is None else min(free, limit)


def human(nbytes: float) -> str:
    for unit, size in (("GiB", GB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} bytes"


def check(stage: str, needs: Needs, store_root: Path) -> None:
    """Raise NotEnoughResources, with the figures, when ``needs`` does not fit."""
    disk, memory = free_disk(store_root), available_memory()
    how = f" ({needs.what})" if needs.what else ""
    if needs.disk > disk:
        raise NotEnoughResources(
            f"{stage} needs about {human(needs.disk)} of disk in {store_root}{how}, and "
            f"{human(disk)} is free; free some space (make gc removes versions the graph no longer "
            f"uses) or point PIPELINE_ARTIFACTS at a larger disk")
    if needs.memory > memory:
        raise NotEnoughResources(
            f"{stage} needs about {human(needs.memory)} of memory{how}, and {human(memory)} is "
            f"available; stop other jobs or run it on a larger machine")


def int8_export_bytes(fp32: float) -> float:
    """The int8 export of a model of ``fp32`` bytes (``pipeline.quant.export_int8``): a byte per
    weight of its linear layers and embedding, which hold nearly all of it (their fp16 row scales,
    and the LayerNorms and biases in fp16, are a fraction of a percent)."""
    return fp32 / 4


def training_needs(student: float, local_ranks: int, teacher: float = 0.0, export_int8: bool = False) -> Needs:
    """A training stage, from the fp32 bytes of its student and teacher: on disk the model it
    publishes, the resume checkpoint (weights and AdamW's two moments) and the int8 export; in
    memory, every local rank loading both models' weights before sharding (the per-rank plan
    of ``pipeline.memory`` then runs inside the training, before any weight is loaded)."""
    disk = student + 3 * student + (int8_export_bytes(student) if export_int8 else 0.0)
    memory = local_ranks * (student + teacher)
    return Needs(disk, memory, f"a {student / GB:.2f} GiB fp32 model, its resume state"
                               f"{', its int8 export' if export_int8 else ''}"
                               f"{', a teacher' if teacher else ''}; {local_ranks} local rank(s)")
