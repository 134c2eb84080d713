"""fbgemm's int8 GEMM (the CPU's dynamic-quantization linear layer) in QAT's arithmetic: each token
quantized to int8 with its own scale, as training quantized it, instead of fbgemm's one 7-bit scale
per call.

fbgemm quantizes a call's input with scale (max - min) / 255 and a zero point. Rows that already
hold integers in [-127, 127], with one more row spanning -128 to 127, get scale 1 and zero point
128: fbgemm's uint8 input is then the integers plus 128, exactly, and its int32 product the exact
integer product, which is scaled per token here. That holds where fbgemm sums u8 x s8 products
without saturating (AVX512-VNNI's dpbusd); AVX2's maddubs saturates a pair above 32767, so
``exact()`` tries that worst case once per process, and where it fails calls keep fbgemm's own
per-call quantization to 7 bits (which never saturates).
"""
from __future__ import annotations

import functools
import warnings

import torch

from kernels import moe_gemv
from kernels.int8 import scale_and_quantize


def pack(q_weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fbgemm's packed form of int8 rows (out, in) with one scale each, without a bias (``linear``
    adds it after the tokens' scales)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated API, still the way to fbgemm
        warnings.simplefilter("ignore")
        w = torch._make_per_channel_quantized_tensor(
            q_weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(w, None)


@functools.cache
def exact() -> bool:
    """Whether fbgemm's int8 product is exact here for the widest inputs: 255 x 127 in every pair."""
    k = 64
    x = torch.full((2, k), 127.0)
    x[1, :2] = torch.tensor([-128.0, 127.0])
    packed = pack(torch.full((2, k), 127, dtype=torch.int8), torch.ones(2))
    return torch.ops.quantized.linear_dynamic(x, packed, False)[0].eq(127 * 127 * k).all().item()


def _quantized_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x's rows quantized as QAT quantizes them, as fp32 integers, with the row spanning -128 to
    127 appended; their scales)."""
    q = torch.empty(len(x) + 1, x.shape[1])  # the token rows are all written below
    q[-1].zero_()
    q[-1, :2] = torch.tensor([-128.0, 127.0])
    if moe_gemv.available():
        return q, moe_gemv.quantize_rows(x, q)
    scale, ints = scale_and_quantize(x, dim=1)
    q[:-1] = ints
    return q, scale.float().view(-1)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 (tokens, out) for ``x`` (tokens, in) fp32 through the ``pack``ed weight: tokens
    quantized one by one where ``exact()``, else fbgemm's one 7-bit scale for the call."""
    if exact() and x.shape[1] >= 2:
        q, scales = _quantized_tokens(x)
        y = torch.ops.quantized.linear_dynamic(q, packed, False)[:-1].mul_(scales[:, None])
    else:
        y = torch.ops.quantized.linear_dynamic(x, packed, True)
    return y.add_(bias) if bias is not None else y
