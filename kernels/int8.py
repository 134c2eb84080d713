"""The int8 GEMM of ``cpm_kernels.torch.bmm(A, aT, B, bT, int8=True)`` on every device.

The arithmetic follows ../shared/reference/int8-gemm-spec.md (read from cpm_kernels 1.0.11):

* scales are reduced over K whatever the layout: ``sA[b, m] = fp16(max_k |A_op| / 127)`` per
  row of A_op and ``sB[b, n] = fp16(max_k |B_op| / 127)`` per column of B_op; NaN is ignored by
  the max;
* ``q = round_half_even(fp32(x) / fp32(s))``, **clamped to [-127, 127]** (the one deliberate
  deviation: cpm_kernels wraps to the low byte and flips signs for rows whose fp16 scale is
  subnormal); a zero scale (an all-zero row) gives q = 0; NaN entries quantize to 0;
* exact integer accumulation, then ``C = fp16((fp32(acc) * fp32(sA[m])) * fp32(sB[n]))``;
* backward: a straight-through estimator that quantizes the gradient per row (for A) or per
  column (for B) after multiplying it by the other operand's scales, see ``_Int8BMM.backward``
  (``grad="int8"``, cpm_kernels'); or, with ``grad="float"``, the straight-through estimator in
  the operands' precision (in the forward's autocast precision when it ran under autocast): the
  gradients of the dequantized product, ``G @ B_q^T`` and ``A_q^T @ G``. The int8 gradient
  keeps, per output neuron, one scale over every token of the batch, so most tokens'
  contributions round to zero: fine-tuning a trained gpt-j-tiny with it
  raised its perplexity from 49.8 to 58.4 in 60 steps, where the float estimator lowered it.

A row of A_op (column of B_op) holding +-inf has an infinite scale; its finite entries quantize to
0 and its outputs come out NaN or inf, as in fp16 arithmetic.

cpm_kernels takes fp16 only. For fp32 and bf16 operands the quantization is the same (same fp16
scales, same int8 values, same integer products) but the fp16 roundings of the output, of the
incoming gradient and of the outgoing gradients are left out: the results are computed in fp32
and returned in the operands' dtype. (Rounding a training gradient to fp16 without loss scaling
flushes small gradients to zero.)

Integer products run on one of these backends (``int8_backend()`` reports the automatic choice):

* ``cpm_kernels``: the original CUDA kernels, on the GPUs its wheel was built for;
* ``cuda``: ``torch._int_mm`` (cuBLASLt int8) on other GPUs (Hopper);
* ``cpu-exact``: float64 matmul of the int8 values, exact below 2**53 (reference tests);
* ``cpu-onednn``: ``torch._int_mm`` on CPU (oneDNN; int32 accumulation, exact while K * 127**2 <
  2**31, i.e. K < 133,000: so it equals ``cpu-exact`` bit for bit at every GPT-J size);
* ``cpu-fp32``: an fp32 GEMM of the int8 values over blocks of at most ``FP32_EXACT_K`` of K
  (every product and partial sum is an integer below 2**24, so each block is exact in any
  summation order), the blocks added in int32: the same integers as oneDNN's;
* ``cpu-fast``: whichever of those two measured faster on this machine (``cpu_product``). Both are
  exact, so the choice changes no result. oneDNN has fast int8 kernels only where the CPU has
  int8 dot-product instructions (AVX512-VNNI, AMX); elsewhere (AVX2) its int8 GEMM measured 15-70x
  slower than the fp32 one (``bench/int8.py``).
"""
from __future__ import annotations

import functools

import torch

from kernels.backend import cpm_kernels_status

BACKENDS = ("cpm_kernels", "cuda", "cpu-exact", "cpu-onednn", "cpu-fp32", "cpu-fast")
FP32_EXACT_K = 1024  # K * 127**2 < 2**24: an fp32 GEMM of int8 values over this much of K is exact
INT8_MAX = 127


@functools.lru_cache(maxsize=None)
def int8_backend(device_type: str = "cpu") -> str:
    """The backend ``bmm(..., int8=True)`` uses for tensors on ``device_type``."""
    if device_type == "cuda":
        return "cpm_kernels" if cpm_kernels_status()[0] else "cuda"
    return "cpu-fast"


CHUNK = 1 << 18  # elements per chunk of the cache-blocked quantizer (1 MiB of fp32)


def _absmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32(max |x|) along ``dim`` (kept), ignoring NaN."""
    a = torch.linalg.vector_norm(x, float("inf"), dim=dim, keepdim=True).float()  # one pass, exact
    if torch.isnan(a).any():  # rare: recompute with NaN counted as 0
        a = torch.where(torch.isnan(x), torch.zeros_like(x), x).abs().amax(dim=dim, keepdim=True).float()
    return a


def absmax_scale(x: torch.Tensor, dim: int) -> torch.Tensor:
    """fp16(fp32(max |x|) / 127) along ``dim`` (kept), ignoring NaN."""
    return (_absmax(x, dim) / INT8_MAX).half()


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round_half_even(fp32(x) / fp32(scale)) clamped to +-127, as int8; 0 where the scale is 0
    and for NaN entries."""
    return _quantize_into(x, scale, torch.empty(x.shape, dtype=torch.float32, device=x.device))


def _quantize_into(x: torch.Tensor, scale: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    s = torch.where(s == 0, torch.full_like(s, float("inf")), s)  # x / inf = 0 for finite x
    torch.div(x, s, out=buf)
    buf.round_()
    if _has_nan(buf):
        buf.nan_to_num_(nan=0.0)
    return buf.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def scale_and_quantize(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(absmax_scale(x, dim), quantize(x, scale)) in one read of ``x`` where the reduction runs
    along contiguous memory: row blocks small enough to stay in cache are scaled and quantized
    in turn. Elementwise, so the result is identical to the two calls; for a weight it is about
    three times faster on CPU than whole-tensor passes, which are memory-bound."""
    if x.device.type != "cpu" or dim != x.dim() - 1 or not x.is_contiguous() or x.numel() <= CHUNK:
        scale = absmax_scale(x, dim)
        return scale, quantize(x, scale)
    flat = x.view(-1, x.shape[-1])
    rows = max(1, CHUNK // flat.shape[1])
    q = torch.empty(flat.shape, dtype=torch.int8)
    scale = torch.empty(flat.shape[0], 1, dtype=torch.float16)
    buf = torch.empty(rows, flat.shape[1])
    for i in range(0, flat.shape[0], rows):
        block = flat[i:i + rows]
        scale[i:i + rows] = absmax_scale(block, 1)
        q[i:i + rows] = _quantize_into(block, scale[i:i + rows], buf[:len(block)])
    return scale.view(*x.shape[:-1], 1), q.view(x.shape)


def _has_nan(q: torch.Tensor) -> bool:
    # a NaN entry of x survives the division and rounding; max() propagates it, in one pass
    return bool(torch.isnan(q.amax()))


def int_matmul(qa: torch.Tensor, qb: torch.Tensor, backend: str) -> torch.Tensor:
    """Exact integer product of int8 tensors (b, M, K) @ (b, K, N), broadcasting a batch of 1:
    int32 from the int8 GEMM (or the blocked fp32 one), fp32 from one exact fp32 block, or fp32
    from the float64 reference (the spec's ``fp32(acc)``): the same values either way."""
    # an autocast region (training under bf16) would run the float GEMMs below in bf16: inexact,
    # and which backend runs is chosen by timing, so results would change with the machine's load
    with torch.autocast(qa.device.type, enabled=False):
        return _int_matmul(qa, qb, backend)


def _int_matmul(qa: torch.Tensor, qb: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cpu-exact" or not _int_mm_fits(qa, qb):
        return torch.matmul(qa.double(), qb.double()).float()
    cuda = qa.device.type == "cuda"
    if not cuda and backend == "cpu-fast":
        backend = cpu_product()
    if backend == "cpu-fp32":
        return _fp32_product(qa, qb)

    def mm(a, b):  # oneDNN on CPU takes strided operands as they are; cuBLASLt wants them dense
        return torch._int_mm(a.contiguous(), b.contiguous()) if cuda else torch._int_mm(a, b)

    m, n = qa.shape[1], qb.shape[2]
    if qb.shape[0] == 1:  # one B for the whole batch (a weight): fold the batch into M, one GEMM
        return mm(qa.reshape(-1, qa.shape[2]), qb[0]).view(qa.shape[0], m, n)
    qa = qa.expand(qb.shape[0], -1, -1)
    return torch.stack([mm(qa[i], qb[i]) for i in range(qb.shape[0])])


def _fp32_product(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """``int_matmul`` as fp32 GEMMs over blocks of ``FP32_EXACT_K`` of K, each exact, added in int32."""
    k = qa.shape[-1]
    if k <= FP32_EXACT_K:
        return torch.matmul(qa.float(), qb.float())
    acc = None
    for i in range(0, k, FP32_EXACT_K):
        part = torch.matmul(qa[..., i:i + FP32_EXACT_K].float(), qb[..., i:i + FP32_EXACT_K, :].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


@functools.lru_cache(maxsize=None)
def cpu_product() -> str:
    """``cpu-onednn`` or ``cpu-fp32``, whichever computes a (256, 256) x (256, 1024) int8 product
    (a weight's transposed view, as the linear layers pass it) faster here: the median of 3 calls
    each after one to warm up, once per process."""
    import time

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (1, 256, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (1, 1024, 256), dtype=torch.int8, generator=g).transpose(1, 2)

    def seconds(backend: str) -> float:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            int_matmul(a, b, backend)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[1]
    return min(("cpu-onednn", "cpu-fp32"), key=seconds)


def _int_mm_fits(qa: torch.Tensor, qb: torch.Tensor) -> bool:
    # cuBLASLt's int8 GEMM wants M > 16 and K, N multiples of 8; the CPU kernel takes any shape
    if qa.device.type != "cuda":
        return True
    rows = qa.shape[0] * qa.shape[1] if qb.shape[0] == 1 else qa.shape[1]
    return rows > 16 and qa.shape[2] % 8 == 0 and qb.shape[2] % 8 == 0


def rescale(acc: torch.Tensor, row: torch.Tensor, col: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """fp16((fp32(acc) * fp32(row)) * fp32(col)): two fp32 multiplies in that order, one rounding
    (left out when ``fp16`` is false). An int32 ``acc`` is promoted to fp32 by the multiply."""
    out = acc * row.float()
    out.mul_(col.float())
    return out.half() if fp16 else out


def int8_linear(x: torch.Tensor, q_weight: torch.Tensor, scale: torch.Tensor, fp16: bool = False,
                backend: str | None = None) -> torch.Tensor:
    """``x @ w^T`` for tokens ``x`` (tokens, in) and a weight quantized beforehand, int8 (out, in)
    with one scale per row (``scale_and_quantize(w, dim=1)``): the forward of ``bmm(x, w^T,
    int8=True)`` (QAT's) with the weight's half done once. ``fp16``: the spec's final rounding."""
    s_x, q_x = scale_and_quantize(x, dim=1)
    acc = int_matmul(q_x[None], q_weight.T[None], backend or int8_backend(x.device.type))[0]
    return rescale(acc, s_x, scale.reshape(1, -1), fp16=fp16)


def _scaled(acc: torch.Tensor, s: torch.Tensor, fp16: bool) -> torch.Tensor:
    """fp16(fp32(acc) * fp32(fp16(s))): the gradients' single rescale (both fp16 roundings left out
    when ``fp16`` is false). A large per-row-scaled weight gradient is done in cache-sized row blocks."""
    if fp16:
        return (acc * s.half().float()).half()
    if acc.device.type != "cpu" or acc.numel() <= CHUNK or s.shape[-1] != 1 or not acc.is_contiguous():
        return acc * s
    out = torch.empty(acc.shape, dtype=torch.float32)
    flat, out_flat = acc.view(-1, acc.shape[-1]), out.view(-1, acc.shape[-1])
    s_flat = s.expand(*acc.shape[:-1], 1).reshape(-1, 1)
    rows = max(1, CHUNK // flat.shape[1])
    for i in range(0, flat.shape[0], rows):
        torch.mul(flat[i:i + rows], s_flat[i:i + rows], out=out_flat[i:i + rows])
    return out


def _quantize_grad(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row/column quantization of the fp32 gradient product ``t``, its scale kept in fp32:
    (qG as int8, s)."""
    s = _absmax(t, dim) / INT8_MAX
    return _quantize_into(t, s, torch.empty_like(t)), s


def _reduce_to(grad: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum over the broadcast batch for an operand given with batch 1 (in fp32, then one rounding
    back to the gradient's dtype)."""
    if batch == 1 and grad.shape[0] > 1:
        return grad.float().sum(0, keepdim=True).to(grad.dtype)
    return grad


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


class _Int8BMM(torch.autograd.Function):
    """Everything is computed in the operands' stored layouts (transposes are views), so that a
    weight stored (out, in) is scaled, quantized and multiplied without being copied."""

    @staticmethod
    def forward(ctx, A, B, aT: bool, bT: bool, backend: str, grad: str = "int8"):
        s_a, q_a = scale_and_quantize(A, dim=1 if aT else 2)  # per row of A_op, reduced over K
        s_b, q_b = scale_and_quantize(B, dim=2 if bT else 1)  # per column of B_op; stored layouts
        s_a, q_a = (_t(s_a), _t(q_a)) if aT else (s_a, q_a)  # -> op layouts: s_a (bA, M, 1)
        s_b, q_b = (_t(s_b), _t(q_b)) if bT else (s_b, q_b)  # s_b (bB, 1, N)
        half = torch.promote_types(A.dtype, B.dtype) == torch.float16
        out = rescale(int_matmul(q_a, q_b, backend), s_a, s_b, fp16=half)
        ctx.save_for_backward(s_a, q_a, s_b, q_b)
        ctx.meta = (aT, bT, backend, A.shape[0], B.shape[0], A.dtype, B.dtype, grad)
        device = A.device.type  # the float backward's products run in the forward's autocast precision
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad):
        s_a, q_a, s_b, q_b = ctx.saved_tensors
        aT, bT, backend, batch_a, batch_b, dtype_a, dtype_b, mode = ctx.meta
        g = grad.float()  # fp16 for fp16 operands, as the spec's G; wider operands keep their precision
        if mode == "float":
            device, dtype, enabled = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                return _float_backward(ctx, g) + (None, None, None, None)
        half = grad.dtype == torch.float16
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            q_g, s = _quantize_grad(g * s_b.float(), dim=2)  # per row m
            if aT:  # stored (K, M) = q_b_op @ q_g^T, scaled per column m
                g_a = _scaled(int_matmul(q_b, _t(q_g), backend), _t(s), half)
            else:
                g_a = _scaled(int_matmul(q_g, _t(q_b), backend), s, half)
            grad_a = _reduce_to(g_a, batch_a).to(dtype_a)
        if ctx.needs_input_grad[1]:
            q_g, s = _quantize_grad(g * s_a.float(), dim=1)  # per column n
            if bT:  # stored (N, K) = q_g^T @ q_a_op, scaled per row n
                g_b = _scaled(int_matmul(_t(q_g), q_a, backend), _t(s), half)
            else:
                g_b = _scaled(int_matmul(_t(q_a), q_g, backend), s, half)
            grad_b = _reduce_to(g_b, batch_b).to(dtype_b)
        return grad_a, grad_b, None, None, None, None


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for (batch, M, K) @ (batch, K, N), one 2-D GEMM when both batches are 1 (faster than bmm)."""
    if a.shape[0] == b.shape[0] == 1:
        return (a[0] @ b[0])[None]
    return a @ b


def _float_backward(ctx, g: torch.Tensor) -> tuple:
    """Gradients of ``A_q @ B_q`` (the dequantized operands) in fp32, in the stored layouts."""
    s_a, q_a, s_b, q_b = ctx.saved_tensors
    aT, bT, _, batch_a, batch_b, dtype_a, dtype_b, _ = ctx.meta
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        g_a = _matmul(g, _t(q_b * s_b.float()))  # (b, M, K)
        grad_a = _reduce_to(_t(g_a) if aT else g_a, batch_a).to(dtype_a)
    if ctx.needs_input_grad[1]:
        g_b = _matmul(_t(q_a * s_a.float()), g)  # (b, K, N)
        grad_b = _reduce_to(_t(g_b) if bT else g_b, batch_b).to(dtype_b)
    return grad_a, grad_b
