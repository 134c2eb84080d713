"""kernels.bmm(int8=True) against an independent numpy implementation of
../shared/reference/int8-gemm-spec.md, written here from the spec's text (not from kernels/)."""
import numpy as np
import pytest
import torch

import kernels
from kernels import bmm

F16, F32 = np.float16, np.float32


# ------------------------------------------------------------------ the spec, in numpy

def ref_absmax(x, axis):
    a = np.abs(x.astype(F32))
    a[np.isnan(a)] = 0  # NaN is ignored by the max
    return a.max(axis=axis, keepdims=True)


def ref_quant(x32, scale32):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.round(x32 / scale32)  # numpy rounds half to even
    q[np.broadcast_to(scale32 == 0, q.shape) | np.isnan(q)] = 0
    return np.clip(q, -127, 127).astype(np.int64)


def to16(x, half):
    return x.astype(F16) if half else x


def ref_forward(a_op, b_op, half=True):
    """a_op (b, M, K), b_op (b, K, N) as float32 arrays -> C (fp16), saved state."""
    s_a = (ref_absmax(a_op, 2) / F32(127)).astype(F16)  # fp16(fp32(max) / 127)
    s_b = (ref_absmax(b_op, 1) / F32(127)).astype(F16)
    q_a, q_b = ref_quant(a_op, s_a.astype(F32)), ref_quant(b_op, s_b.astype(F32))
    acc = np.matmul(q_a, q_b)  # exact in int64
    c = to16((acc.astype(F32) * s_a.astype(F32)) * s_b.astype(F32), half)
    return c, (s_a, q_a, s_b, q_b)


def ref_quant_grad(t, axis):
    s = ref_absmax(t, axis) / F32(127)  # kept in fp32 for the rounding
    return ref_quant(t, s), s


def ref_backward(g, state, half=True):
    s_a, q_a, s_b, q_b = state
    t = g.astype(F32) * s_b.astype(F32)
    q_g, s = ref_quant_grad(t, 2)
    g_a = to16(np.matmul(q_g, np.swapaxes(q_b, 1, 2)).astype(F32) * to16(s, half).astype(F32), half)
    t = g.astype(F32) * s_a.astype(F32)
    q_g, s = ref_quant_grad(t, 1)
    g_b = to16(np.matmul(np.swapaxes(q_a, 1, 2), q_g).astype(F32) * to16(s, half).astype(F32), half)
    return g_a, g_b


def ref_bmm(A, aT, B, bT, G, half=True):
    """Forward and (given the upstream gradient G) the gradients in stored layouts; with
    ``half`` false, the project's fp32 variant: no fp16 rounding of C, G or the gradients."""
    a = A.float().numpy()
    b = B.float().numpy()
    a_op = np.swapaxes(a, 1, 2) if aT else a
    b_op = np.swapaxes(b, 1, 2) if bT else b
    batch = max(a_op.shape[0], b_op.shape[0])
    c, state = ref_forward(a_op, b_op, half)
    g_a, g_b = ref_backward((G.half() if half else G.float()).numpy(), state, half)
    if A.shape[0] == 1 and batch > 1:
        g_a = to16(g_a.astype(F32).sum(0, keepdims=True), half)
    if B.shape[0] == 1 and batch > 1:
        g_b = to16(g_b.astype(F32).sum(0, keepdims=True), half)
    g_a = np.swapaxes(g_a, 1, 2) if aT else g_a
    g_b = np.swapaxes(g_b, 1, 2) if bT else g_b
    return c, g_a, g_b


# ------------------------------------------------------------------ helpers

def operands(rng, ba, bb, m, k, n, aT, bT, dtype=torch.float16, scale=1.0):
    a_shape = (ba, k, m) if aT else (ba, m, k)
    b_shape = (bb, n, k) if bT else (bb, k, n)
    A = (torch.randn(a_shape, generator=rng) * scale).to(dtype)
    B = (torch.randn(b_shape, generator=rng) * scale).to(dtype)
    return A, B


def run_ours(A, aT, B, bT, G, backend):
    A = A.clone().requires_grad_()
    B = B.clone().requires_grad_()
    C = bmm(A, aT, B, bT, int8=True, backend=backend)
    C.backward(G.to(C.dtype))
    return C, A.grad, B.grad


def assert_bitexact(ours, ref):
    if ref.dtype == F16:
        ours = ours.detach().half().numpy()
        np.testing.assert_array_equal(ours.view(np.uint16), ref.view(np.uint16))
    else:
        ours = ours.detach().float().numpy()
        np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(F32).view(np.uint32))


BACKENDS = ["cpu-exact", "cpu-onednn", "cpu-fp32", "cpu-fast"]


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aT", [False, True])
@pytest.mark.parametrize("bT", [False, True])
@pytest.mark.parametrize("batches", [(1, 1), (3, 3), (1, 4), (4, 1)])
def test_bitexact_against_the_spec(backend, aT, bT, batches):
    rng = torch.Generator().manual_seed(hash((aT, bT, batches)) % 2**31)
    for m, k, n in [(8, 16, 12), (5, 33, 7), (20, 64, 24)]:
        A, B = operands(rng, *batches, m, k, n, aT, bT)
        G = torch.randn(max(batches), m, n, generator=rng).half()
        c, g_a, g_b = run_ours(A, aT, B, bT, G, backend)
        rc, rg_a, rg_b = ref_bmm(A, aT, B, bT, G)
        assert c.dtype == torch.float16 and tuple(c.shape) == (max(batches), m, n)
        assert_bitexact(c, rc)
        assert_bitexact(g_a, rg_a)
        assert_bitexact(g_b, rg_b)
        assert g_a.shape == A.shape and g_b.shape == B.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wider_dtypes_quantize_the_same_and_skip_the_fp16_roundings(backend, dtype):
    rng = torch.Generator().manual_seed(7)
    A, B = operands(rng, 2, 1, 12, 32, 16, False, True, dtype=dtype)
    G = torch.randn(2, 12, 16, generator=rng).to(dtype)  # the gradient arrives in the output dtype
    c, g_a, g_b = run_ours(A, False, B, True, G, backend)
    rc, rg_a, rg_b = ref_bmm(A, False, B, True, G, half=False)
    assert c.dtype == dtype and g_a.dtype == dtype and g_b.dtype == dtype
    for ours, ref in ((c, rc), (g_a, rg_a), (g_b, rg_b)):
        if dtype == torch.float32:
            assert_bitexact(ours, ref)
        else:  # one rounding to bf16
            np.testing.assert_allclose(ours.detach().float().numpy(), ref, rtol=2**-8, atol=0)
    if dtype == torch.float32:  # and the fp16 spec's forward is this rounded to fp16
        assert_bitexact(c.half(), ref_bmm(A, False, B, True, G)[0])


def test_small_fp32_gradients_do_not_flush_to_zero():
    rng = torch.Generator().manual_seed(8)
    A, B = operands(rng, 1, 1, 8, 32, 8, False, True, dtype=torch.float32)
    G = torch.randn(1, 8, 8, generator=rng) * 1e-9  # below fp16's smallest subnormal
    _, g_a, g_b = run_ours(A, False, B, True, G, "cpu-fast")
    assert (g_a != 0).any() and (g_b != 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_and_tiny_rows(backend):
    rng = torch.Generator().manual_seed(3)
    A, B = operands(rng, 1, 1, 8, 16, 8, False, False)
    A[0, 2] = 0  # an all-zero row: scale 0, q 0, no NaN anywhere
    # absmax below ~9e-4 gives a subnormal fp16 scale; this one (20.4 subnormal steps) rounds down
    # to 20 steps, so unclamped the largest entry would quantize to 127 * 20.4 / 20 = 129.5
    A[0, 3] = (A[0, 3].float() * 5e-5).clamp(-1e-4, 1e-4).half()
    A[0, 3, 0] = 127 * 20.4 * 2.0**-24
    A[0, 4] = A[0, 4] * 1e-9  # scale rounds to 0 in fp16
    B[0, :, 5] = 0
    G = torch.randn(1, 8, 8, generator=rng).half()
    G[0, 6] = 0
    c, g_a, g_b = run_ours(A, False, B, False, G, backend)
    rc, rg_a, rg_b = ref_bmm(A, False, B, False, G)
    for ours, ref in ((c, rc), (g_a, rg_a), (g_b, rg_b)):
        assert torch.isfinite(ours).all()
        assert_bitexact(ours, ref)
    assert (c[0, 2] == 0).all() and (c[0, :, 5] == 0).all() and (g_a[0, 6] == 0).all()
    # the clamp is what the tiny row exercises: unclamped, some |q| would exceed 127
    s = (A[0, 3].float().abs().max() / 127).half().float()
    assert (A[0, 3].float() / s).abs().max() > 127.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf(backend):
    """Documented behaviour: NaN entries count as 0 (ignored by the max, quantized to 0); a row
    holding inf has an infinite scale, so its finite entries quantize to 0 and its outputs are
    not finite. Other rows are unaffected."""
    rng = torch.Generator().manual_seed(5)
    A, B = operands(rng, 1, 1, 6, 8, 4, False, False)
    A[0, 1, 3] = float("nan")
    A[0, 2, 0] = float("inf")
    c = bmm(A, False, B, False, int8=True, backend=backend)
    clean = A.clone()
    clean[0, 1, 3] = 0
    expected = bmm(clean, False, B, False, int8=True, backend=backend)
    assert torch.equal(c[0, 1], expected[0, 1])
    assert not torch.isfinite(c[0, 2]).any()
    rows = [0, 3, 4, 5]
    assert torch.equal(c[0, rows], expected[0, rows])


@pytest.mark.parametrize("backend", ["cpu-onednn", "cpu-fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fast_paths_equal_the_exact_path_at_model_sizes(backend, dtype):
    """The bounds: oneDNN accumulates in int32, exact while K * 127**2 < 2**31, i.e. K < 133,000;
    the fp32 GEMM is exact on blocks of 1024 of K, added in int32. So at every GPT-J size both
    equal the float64 path bit for bit, forward and backward (K = 4096: four fp32 blocks; the
    weight is large enough to take the cache-blocked quantizer)."""
    rng = torch.Generator().manual_seed(11)
    A, B = operands(rng, 1, 1, 64, 4096, 1024, False, True, dtype=dtype)
    G = torch.randn(1, 64, 1024, generator=rng).to(dtype)
    fast = run_ours(A, False, B, True, G, backend)
    exact = run_ours(A, False, B, True, G, "cpu-exact")
    for f, e in zip(fast, exact):
        assert torch.equal(f, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_products_are_exact_inside_autocast(backend):
    """Training runs under bf16 autocast, which would take the fp32 GEMM of the int8 values to
    bf16; the timed choice between backends then changed QAT's results with the machine's load
    (a resumed FinalCompressed run 3e-3 away from the uninterrupted one)."""
    from kernels.int8 import int_matmul

    g = torch.Generator().manual_seed(12)
    a = torch.randint(-127, 128, (2, 24, 300), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (1, 300, 40), dtype=torch.int8, generator=g)
    expected = a.long() @ b.long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = int_matmul(a, b, backend)
    assert got.dtype in (torch.int32, torch.float32)
    assert torch.equal(got.long(), expected)


def test_the_fp32_product_is_exact_at_the_extremes_of_its_blocks():
    from kernels.int8 import FP32_EXACT_K, cpu_product, int_matmul

    for k in (FP32_EXACT_K, FP32_EXACT_K + 1, 3 * FP32_EXACT_K - 5):
        a = torch.full((1, 3, k), -127, dtype=torch.int8)
        a[0, 1, ::2] = 127
        b = torch.full((1, k, 2), 127, dtype=torch.int8)
        b[0, 1::3, 1] = -1
        expected = (a.long() @ b.long())[0]
        assert torch.equal(int_matmul(a, b, "cpu-fp32")[0].long(), expected), k
        assert torch.equal(int_matmul(a, b, "cpu-onednn")[0].long(), expected), k
    assert cpu_product() in ("cpu-onednn", "cpu-fp32")


def test_not_int8_is_a_plain_batched_matmul():
    rng = torch.Generator().manual_seed(2)
    A, B = operands(rng, 2, 1, 4, 8, 6, True, False, dtype=torch.float32)
    assert torch.allclose(bmm(A, True, B, False), A.transpose(1, 2) @ B)


def test_int8_is_close_to_fp32():
    rng = torch.Generator().manual_seed(1)
    A, B = operands(rng, 1, 1, 32, 256, 64, False, True, dtype=torch.float32)
    exact = A @ B.transpose(1, 2)
    err = (bmm(A, False, B, True, int8=True) - exact).abs().max() / exact.abs().max()
    assert 0 < err < 0.02


def test_backend_report():
    assert kernels.int8_backend("cpu") == "cpu-fast"
    usable, reason = kernels.cpm_kernels_status()
    if not torch.cuda.is_available():
        assert usable is False and reason == "no CUDA device"


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 3), False, torch.zeros(1, 3, 4), False), "A has shape (2, 3), expected 3 dimensions"),
    ((torch.zeros(1, 2, 3), False, torch.zeros(1, 4, 5), False), "do not share the reduced dimension K (3 vs 4)"),
    ((torch.zeros(2, 2, 3), False, torch.zeros(3, 3, 5), False), "batch sizes 2 and 3 differ"),
    ((torch.zeros(1, 2, 3, dtype=torch.int32), False, torch.zeros(1, 3, 5), False), "A has dtype torch.int32"),
    (([[1.0]], False, torch.zeros(1, 3, 5), False), "A is a list, expected a torch.Tensor"),
])
def test_bad_shapes_and_dtypes(args, message):
    with pytest.raises((ValueError, TypeError)) as e:
        bmm(*args, int8=True)
    assert message in str(e.value)


def test_cuda_paths_equal_the_exact_cpu_path():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (bench/gpu_check.sh runs this on a lent GPU)")
    rng = torch.Generator().manual_seed(9)
    for aT in (False, True):
        for bT in (False, True):
            A, B = operands(rng, 2, 1, 64, 128, 96, aT, bT)
            G = torch.randn(2, 64, 96, generator=rng).half()
            exact = run_ours(A, aT, B, bT, G, "cpu-exact")
            backends = ["cuda"] + (["cpm_kernels"] if kernels.cpm_kernels_status()[0] else [])
            for backend in backends:
                got = run_ours(A.cuda(), aT, B.cuda(), bT, G.cuda(), backend)
                for g, e in zip(got, exact):
                    assert torch.equal(g.cpu(), e), backend


@pytest.mark.parametrize("aT, bT, batches", [(False, True, (1, 3)), (True, False, (2, 2)), (False, False, (3, 1))])
def test_float_grad_is_the_straight_through_gradient_of_the_dequantized_product(aT, bT, batches):
    from kernels.int8 import absmax_scale, quantize

    torch.manual_seed(0)
    m, k, n = 6, 20, 5
    A = torch.randn(batches[0], *((k, m) if aT else (m, k)), requires_grad=True)
    B = torch.randn(batches[1], *((n, k) if bT else (k, n)), requires_grad=True)
    G = torch.randn(max(batches), m, n)
    out = bmm(A, aT, B, bT, int8=True, grad="float")
    (out * G).sum().backward()

    def dequantized(x, dim):  # what the forward multiplied, as a leaf
        s = absmax_scale(x.detach(), dim)
        return (quantize(x.detach(), s).float() * s.float()).requires_grad_()

    Aq, Bq = dequantized(A, 1 if aT else 2), dequantized(B, 2 if bT else 1)
    ref = torch.matmul(Aq.transpose(1, 2) if aT else Aq, Bq.transpose(1, 2) if bT else Bq)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    (ref * G).sum().backward()
    torch.testing.assert_close(A.grad, Aq.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B.grad, Bq.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grad 'fp8' is not one of int8, float"):
        bmm(A, aT, B, bT, int8=True, grad="fp8")
