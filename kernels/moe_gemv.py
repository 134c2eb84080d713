"""A few tokens through a MoE FFN's router and chosen experts, or through an int8 linear layer,
in C (``moe_gemv.c``): one call each, where torch's dispatch around small products costs more than
the products.

The C source is compiled on first use by the machine's C compiler for the machine's own vector
unit (``-march=native``) and cached under ``$PIPELINE_KERNEL_CACHE`` (default
``~/.cache/pipeline/kernels``), keyed by the source, the command and the CPU, so that a home
directory shared between an AVX2 and an AVX-512 machine holds one build for each. Without a
compiler, or on a build that fails, ``available()`` is false and says why; the MoE FFN and the
int8 linear layers then keep to the paths torch alone provides (the export's timings leave these out).

The integer products sum exactly in int32 and the scaling around them repeats the sparse path's
fp32 operations, so the result is that path's bit for bit.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")  # no FMA: torch's roundings


def _cpu() -> str:
    """What the compiled code depends on: the architecture and, on Linux, the CPU's feature flags."""
    flags, info = "", Path("/proc/cpuinfo")
    if info.is_file():
        flags = next((line for line in info.read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    return platform.machine() + flags


def _cache_dir() -> Path:
    return Path(os.environ.get("PIPELINE_KERNEL_CACHE") or Path.home() / ".cache" / "pipeline" / "kernels")


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and CPU, compiled once (concurrent builders
    each write a temporary file and the last rename wins: the files are identical)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *FLAGS, _cpu())).encode()).hexdigest()[:16]
    out = _cache_dir() / f"moe_gemv-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "ok"), or (None, why it is not there)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc, gcc or $CC) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(compiler)))  # after torch: its libgomp is the one the library uses
    except (OSError, RuntimeError) as e:
        return None, str(e)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.moe_ffn.argtypes = [ptr, i64, i64, *[ptr] * 7, i64, i64, i64, ptr, ctypes.c_int]
    lib.moe_route.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.moe_routed_ffn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, *[ptr] * 6, i64, ptr, ctypes.c_int]
    lib.int8_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.quantize_rows.argtypes = [ptr, i64, i64, ptr, ptr, ctypes.c_int]
    lib.quantize_rows.restype = None
    lib.attend_one.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.attend_one.restype = ctypes.c_int
    for fn in (lib.moe_ffn, lib.moe_route, lib.moe_routed_ffn, lib.int8_linear):
        fn.restype = ctypes.c_int
    return lib, "ok"


def available() -> bool:
    return _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


def _kernel(name: str):
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the C MoE kernels are not available here: {why}")
    return getattr(lib, name)


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"moe_gemv: {name} must be a contiguous CPU {dtype} tensor, got {t.dtype} on {t.device}")


def moe_ffn(x: torch.Tensor, q_w1: torch.Tensor, s_w1: torch.Tensor, b1: torch.Tensor, q_w2b: torch.Tensor,
            s_w2: torch.Tensor, b2: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """fp32 (tokens, d_model): tokens ``x`` (tokens, d_model), each through its experts ``chosen``
    (tokens, topk), of an int8 ReLU FFN in expert order, in QAT's arithmetic:
    ``pipeline.compressed.Int8MoEFFN._sparse``, bit for bit, in one call. ``q_w1`` (experts * size,
    d_model) and ``q_w2b`` (experts, d_model, size) int8; ``s_w1``, ``b1`` per fc_in neuron and
    ``s_w2``, ``b2`` per output, fp32."""
    fn = _kernel("moe_ffn")
    _check("x", x, torch.float32)
    _check("chosen", chosen, torch.int64)
    num_expert, d, size = _check_experts(q_w1, s_w1, b1, q_w2b, s_w2, b2)
    tokens = len(x)
    if x.shape[1] != d or len(chosen) != tokens:
        raise ValueError(f"moe_gemv: tokens {tuple(x.shape)} and their experts {tuple(chosen.shape)} do not "
                         f"agree with experts of width {d}")
    out = torch.empty(tokens, d)
    if fn(x.data_ptr(), tokens, d, q_w1.data_ptr(), s_w1.data_ptr(), b1.data_ptr(), q_w2b.data_ptr(),
          s_w2.data_ptr(), b2.data_ptr(), chosen.data_ptr(), chosen.shape[1], size, num_expert, out.data_ptr(),
          torch.get_num_threads()) != 0:
        raise MemoryError(f"moe_gemv: out of memory for the buffers of {tokens} tokens")
    return out


def _check_experts(q_w1, s_w1, b1, q_w2b, s_w2, b2) -> tuple[int, int, int]:
    """(experts, d_model, neurons per expert) of an int8 FFN in expert order, its tensors checked."""
    for name, t, dtype in (("q_w1", q_w1, torch.int8), ("s_w1", s_w1, torch.float32), ("b1", b1, torch.float32),
                           ("q_w2b", q_w2b, torch.int8), ("s_w2", s_w2, torch.float32), ("b2", b2, torch.float32)):
        _check(name, t, dtype)
    num_expert, d, size = q_w2b.shape
    if q_w1.shape != (num_expert * size, d) or not len(s_w1) == len(b1) == len(q_w1) or not len(s_w2) == len(b2) == d:
        raise ValueError(f"moe_gemv: shapes do not agree: q_w1 {tuple(q_w1.shape)}, q_w2b {tuple(q_w2b.shape)}, "
                         f"scales {len(s_w1)} / {len(s_w2)}, biases {len(b1)} / {len(b2)}")
    return num_expert, d, size


def _check_router(a: torch.Tensor, b: torch.Tensor, d: int, topk: int) -> None:
    _check("a", a, torch.float32)
    _check("b", b, torch.float32)
    num_expert = len(b)
    if a.shape != (num_expert, d) or b.shape != (num_expert, num_expert) or not 0 < topk <= num_expert:
        raise ValueError(f"moe_gemv: a router over {d} inputs wants a ({num_expert}, {d}) and b ({num_expert}, "
                         f"{num_expert}) and 1 <= topk <= {num_expert}: got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, topk {topk}")


def route(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, topk: int) -> torch.Tensor:
    """int64 (tokens, topk): per token of ``x`` (tokens, d_model) the ``topk`` experts that the
    MoEfication router ``b(tanh(a(normalize(x))))`` scores highest, best first, ties to the lower
    expert (``pipeline.moefication.Router`` and ``top_experts``, up to the order of the fp32 sums,
    which can swap two experts whose scores differ in the last bits). ``a`` (experts, d_model) and
    ``b`` (experts, experts) fp32."""
    fn = _kernel("moe_route")
    _check("x", x, torch.float32)
    _check_router(a, b, x.shape[1], topk)
    chosen = torch.empty(len(x), topk, dtype=torch.int64)
    if fn(x.data_ptr(), len(x), x.shape[1], a.data_ptr(), b.data_ptr(), len(b), topk, chosen.data_ptr(),
          torch.get_num_threads()) != 0:
        raise MemoryError(f"moe_gemv: out of memory routing {len(x)} tokens")
    return chosen


class RoutedFFN:
    """A MoE FFN whole in one C call: ``route``, then ``moe_ffn`` over the experts it chose. The
    weights are checked once, here, and held, so that a call checks only its tokens (the Python
    around one C call is most of a decode step's FFN time at small widths)."""

    def __init__(self, a, b, topk, q_w1, s_w1, b1, q_w2b, s_w2, b2):
        self._fn = _kernel("moe_routed_ffn")
        num_expert, d, size = _check_experts(q_w1, s_w1, b1, q_w2b, s_w2, b2)
        _check_router(a, b, d, topk)
        if len(b) != num_expert:
            raise ValueError(f"moe_gemv: a router over {len(b)} experts for an FFN of {num_expert}")
        self._held = (a, b, q_w1, s_w1, b1, q_w2b, s_w2, b2)  # the pointers below stay valid
        self.d, self.num_expert, self.topk, self.size = d, num_expert, topk, size
        self._router = (a.data_ptr(), b.data_ptr())
        self._experts = tuple(t.data_ptr() for t in (q_w1, s_w1, b1, q_w2b, s_w2, b2))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 (tokens, d_model) for tokens ``x`` (tokens, d_model) fp32."""
        _check("x", x, torch.float32)
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"moe_gemv: tokens must be (tokens, {self.d}), got {tuple(x.shape)}")
        out = torch.empty(len(x), self.d)
        if self._fn(x.data_ptr(), len(x), self.d, *self._router, self.num_expert, self.topk, *self._experts,
                    self.size, out.data_ptr(), torch.get_num_threads()) != 0:
            raise MemoryError(f"moe_gemv: out of memory for the buffers of {len(x)} tokens")
        return out


class HeldCall:
    """For a module that keeps a C call over its own tensors in ``_held_call``: dropped when
    ``.to()`` and the like replace those tensors, and left out of copies and pickles, whose own
    tensors get their own call."""

    _held_call = None

    def _apply(self, fn, *args, **kwargs):
        self._held_call = None
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_held_call"}


class Int8Linear:
    """``kernels.int8.int8_linear(x, q_weight, scale) + bias`` (QAT's arithmetic, tokens quantized
    one by one), bit for bit, in one C call: the weights checked once, here, and held."""

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self._fn = _kernel("int8_linear")
        _check("q_weight", q_weight, torch.int8)
        _check("scale", scale, torch.float32)
        if bias is not None:
            _check("bias", bias, torch.float32)
        if q_weight.dim() != 2 or scale.shape != (len(q_weight),) or (bias is not None and bias.shape != scale.shape):
            raise ValueError(f"moe_gemv: an int8 linear wants q_weight (out, in) and a scale (and bias) per out: "
                             f"got {tuple(q_weight.shape)}, {tuple(scale.shape)}, "
                             f"{None if bias is None else tuple(bias.shape)}")
        self._held = (q_weight, scale, bias)
        (self.n, self.k), self._bias = q_weight.shape, None if bias is None else bias.data_ptr()
        self._weights = (q_weight.data_ptr(), scale.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 (tokens, out) for tokens ``x`` (tokens, in) fp32."""
        _check("x", x, torch.float32)
        if x.dim() != 2 or x.shape[1] != self.k:
            raise ValueError(f"moe_gemv: tokens must be (tokens, {self.k}), got {tuple(x.shape)}")
        out = torch.empty(len(x), self.n)
        if self._fn(x.data_ptr(), len(x), self.k, *self._weights, self._bias, self.n, out.data_ptr(),
                    torch.get_num_threads()) != 0:
            raise MemoryError(f"moe_gemv: out of memory for {len(x)} tokens")
        return out


def quantize_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (tokens, k) fp32 quantized as ``kernels.int8.scale_and_quantize`` does,
    the integers written as fp32 into ``out`` (at least tokens rows of k); returns the scales
    (tokens,) fp32."""
    _check("x", x, torch.float32)
    _check("out", out, torch.float32)
    if x.dim() != 2 or out.dim() != 2 or out.shape[1] != x.shape[1] or len(out) < len(x):
        raise ValueError(f"moe_gemv: quantize_rows wants x (tokens, k) and out with as many columns and at least "
                         f"as many rows: got {tuple(x.shape)} and {tuple(out.shape)}")
    scales = torch.empty(len(x))
    _kernel("quantize_rows")(x.data_ptr(), len(x), x.shape[1], out.data_ptr(), scales.data_ptr(),
                             torch.get_num_threads())
    return scales


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache_k: torch.Tensor, cache_v: torch.Tensor, pos: int) -> torch.Tensor:
    """fp32 (n_head * head_dim,): one new token at position ``pos`` of one sequence through
    attention after its projections, as ``pipeline.models.gptj.Attention`` computes it (rotary
    embedding on q and k with this position's ``cos`` and ``sin`` (rotary_dim), k and v written into
    the caches (n_head, max_len, head_dim), softmax attention over positions 0 .. pos) in one call.
    ``q``, ``k``, ``v`` (n_head, head_dim) fp32; q and k are rotated in place."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("cache_k", cache_k), ("cache_v", cache_v)):
        _check(name, t, torch.float32)
    n_head, max_len, head_dim = cache_k.shape
    if not (q.shape == k.shape == v.shape == (n_head, head_dim) and cache_v.shape == cache_k.shape
            and cos.shape == sin.shape and cos.dim() == 1 and len(cos) <= head_dim and len(cos) % 2 == 0
            and 0 <= pos < max_len):
        raise ValueError(f"moe_gemv: attend_one wants q, k, v ({n_head}, {head_dim}) for caches {tuple(cache_k.shape)}, "
                         f"an even rotary_dim up to {head_dim} and 0 <= pos < {max_len}: got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}, cos {tuple(cos.shape)}, pos {pos}")
    out = torch.empty(n_head * head_dim)
    if _kernel("attend_one")(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), n_head,
                             head_dim, len(cos), cache_k.data_ptr(), cache_v.data_ptr(), max_len, pos, out.data_ptr(),
                             torch.get_num_threads()) != 0:
        raise MemoryError(f"moe_gemv: out of memory attending over {pos + 1} positions")
    return out


def expert_blocks(q_w2: torch.Tensor, num_expert: int) -> torch.Tensor:
    """``fc_out``'s int8 weight (d_model, experts * size) as (experts, d_model, size): one
    contiguous block per expert, the layout ``moe_ffn`` reads."""
    d_model = q_w2.shape[0]
    return q_w2.view(d_model, num_expert, -1).transpose(0, 1).contiguous()
