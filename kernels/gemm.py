"""``bmm``: the seed's ``cpm_kernels.torch.bmm`` contract on every device, and ``linear`` on top."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.int8 import BACKENDS, _Int8BMM, int8_backend

FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32)
GRADS = ("int8", "float")  # the int8 product's backward: cpm_kernels' quantized one, or in float


def _check(A, aT: bool, B, bT: bool) -> None:
    for name, t in (("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"bmm: {name} is a {type(t).__name__}, expected a torch.Tensor")
        if t.dim() != 3:
            raise ValueError(f"bmm: {name} has shape {tuple(t.shape)}, expected 3 dimensions (batch, rows, cols)")
        if t.dtype not in FLOAT_TYPES:
            raise TypeError(f"bmm: {name} has dtype {t.dtype}, expected float16, bfloat16 or float32")
    if A.device != B.device:
        raise ValueError(f"bmm: A is on {A.device} and B on {B.device}, expected one device")
    k_a = A.shape[1] if aT else A.shape[2]
    k_b = B.shape[2] if bT else B.shape[1]
    if k_a != k_b:
        raise ValueError(f"bmm: A{' (transposed)' if aT else ''} {tuple(A.shape)} and B{' (transposed)' if bT else ''} "
                         f"{tuple(B.shape)} do not share the reduced dimension K ({k_a} vs {k_b})")
    if A.shape[0] != B.shape[0] and 1 not in (A.shape[0], B.shape[0]):
        raise ValueError(f"bmm: batch sizes {A.shape[0]} and {B.shape[0]} differ and neither is 1")


def _cpm_fits(A, B, aT, bT) -> bool:
    m = A.shape[2] if aT else A.shape[1]
    k = A.shape[1] if aT else A.shape[2]
    n = B.shape[1] if bT else B.shape[2]
    return (A.dtype == B.dtype == torch.float16 and A.is_contiguous() and B.is_contiguous()
            and m % 4 == 0 and n % 4 == 0 and k % 4 == 0)


def bmm(A: torch.Tensor, aT: bool, B: torch.Tensor, bT: bool, int8: bool = False,
        backend: str | None = None, grad: str = "int8") -> torch.Tensor:
    """C = A_op @ B_op, where A_op is A (bA, M, K), or A stored as (bA, K, M) when ``aT``, and B_op
    is B (bB, K, N), or B stored as (bB, N, K) when ``bT``; a batch of 1 broadcasts. With
    ``int8`` the product is computed as cpm_kernels does (see kernels/int8.py) and is
    differentiable by its straight-through backward. The result has the promoted input dtype
    (fp16 for fp16 inputs, as cpm_kernels; its values are fp16-rounded whatever the dtype).
    ``grad``: "int8", cpm_kernels' quantized backward, or "float", the straight-through
    gradients of the dequantized product."""
    _check(A, aT, B, bT)
    if not int8:
        return torch.matmul(A.transpose(1, 2) if aT else A, B.transpose(1, 2) if bT else B)
    backend = backend or int8_backend(A.device.type)
    if backend not in BACKENDS:
        raise ValueError(f"bmm: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if grad not in GRADS:
        raise ValueError(f"bmm: grad {grad!r} is not one of {', '.join(GRADS)}")
    if backend == "cpm_kernels" and grad == "int8":
        if _cpm_fits(A, B, aT, bT):
            import cpm_kernels.torch as ct

            return ct.bmm(A, aT, B, bT, int8=True)
        backend = "cuda"  # cpm_kernels takes only fp16, contiguous, multiples of 4: same arithmetic here
    return _Int8BMM.apply(A, B, aT, bT, backend, grad).to(torch.promote_types(A.dtype, B.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, int8: bool = False,
           backend: str | None = None, grad: str = "int8") -> torch.Tensor:
    """``F.linear``, or with ``int8`` the seed's int8 linear: tokens are the rows of A (one scale per
    token), the weight (out, in) is B stored transposed (one scale per output neuron)."""
    if not int8:
        return F.linear(x, weight, bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (expected "
                         f"the input's last dimension to be {weight.shape[-1] if weight.dim() else '?'})")
    y = bmm(x.reshape(1, -1, x.shape[-1]), False, weight.unsqueeze(0), True, int8=True, backend=backend, grad=grad)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y
