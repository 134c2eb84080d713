"""Which compute precision training runs in: ``auto`` is bf16 autocast (fp32 master weights,
optimizer and losses) on a GPU, and on a CPU only where a bf16 matrix product measures clearly
faster than the fp32 one (CPUs with native bf16 dot products: AVX512-BF16, AMX); elsewhere fp32.
Evaluation always runs in fp32.
"""
from __future__ import annotations

import functools
import time

import torch

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FASTER = 1.5  # bf16 on a CPU must beat fp32 by this much: a decisive margin, whatever the noise
SHAPE = (2048, 512, 1024)  # M, K, N of the probe: a training step's linear layer


def resolve(choice: str, device_type: str, timings=None) -> str:
    """``choice`` as fp32, bf16 or fp16 on ``device_type``; ``timings``: a function giving the
    (fp32, bf16) seconds of the probe product (the measurement by default)."""
    if choice not in CHOICES:
        raise ValueError(f"precision {choice!r} is not one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16"
    fp32, bf16 = (timings or cpu_matmul_times)()
    return "bf16" if fp32 >= FASTER * bf16 else "fp32"


@functools.lru_cache(maxsize=None)
def cpu_matmul_times(repeat: int = 5) -> tuple[float, float]:
    """The best of ``repeat`` times of the probe product on this CPU, in fp32 and in bf16."""
    m, k, n = SHAPE
    times = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up: the library's first call picks and prepares its kernel
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times[0], times[1]
