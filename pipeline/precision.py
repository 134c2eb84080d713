"""Which compute precision training runs in: ``auto`` is bf16 autocast (fp32 master weights,
optimizer and losses) on a GPU, and on a CPU that computes bf16 dot products natively
(AVX512-BF16 or AMX, where a bf16 training step runs faster than fp32:
``bench/step_costs.py``); elsewhere fp32, since emulated bf16 is slower. Decided from what the CPU
reports, not from a timing, so that a crashed run and its resume, or two ranks, always agree.
Evaluation always runs in fp32.
"""
from __future__ import annotations

import torch

CHOICES = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_cpu_bf16() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve(choice: str, device_type: str, native_bf16=native_cpu_bf16) -> str:
    """``choice`` as fp32, bf16 or fp16 on ``device_type``; ``native_bf16``: whether this CPU has
    native bf16 dot products (what the CPU reports by default)."""
    if choice not in CHOICES:
        raise ValueError(f"precision {choice!r} is not one of {', '.join(CHOICES)}")
    if choice != "auto":
        return choice
    if device_type == "cuda":
        return "bf16"
    return "bf16" if native_bf16() else "fp32"
