"""Serving the compressed model where it is deployed: per layer shape and call size, the fastest
of several kernels, measured on the serving machine and recorded beside the weights.

A ``ServingLinear`` holds a linear layer's int8 weight (one scale per output row) and runs one of

* ``weight_only``: ``F.linear(x, W_int8.to(x.dtype)) * scale``, gpt-fast's WeightOnlyInt8Linear:
  compiled, the cast fuses into the GEMV, which then reads one byte per weight (decode);
* ``w8a8``: tokens quantized per row, ``torch._int_mm`` (cuBLASLt wants more than 16 rows: short
  calls are padded to 17; the weight as the ``.t()`` view of its contiguous (N, K) tensor), both
  scales applied to the int32 product (torchao's ``_int_scaled_matmul``; compiled, inductor fuses
  the quantization into the op producing the input and the scales into the GEMM's epilogue);
* ``sparse24``: the same with the 2:4 int8 weight through cuSPARSELt (``torch._cslt_sparse_mm``);
* ``bf16``: the weight dequantized once to the serving dtype and ``F.linear``, the teacher's kernel,
  kept only where it measured faster than every int8 path: so no layer runs slower than bf16.

``choose_paths`` times each candidate, compiled, for every distinct shape at the call sizes of
``ROWS`` (decode, a short and a long prefill), checks it against the exact product, and keeps the
fastest; ``pick_fastest`` is the rule. ``to_serving`` turns a compressed model (``load_compressed``)
into serving modules on a device; ``Decoder`` prefills and decodes it with every block compiled, a
decoded token as one CUDA graph replay, over a static KV cache.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import methods
from pipeline.compressed import Int8MoEFFN, QLinear, gathered_ffn, load_compressed, median_seconds
from pipeline.quant import Int8Embedding, Int8Linear
from pipeline.sparse24 import is_24

ROWS = (1, 16, 256)  # call sizes timed: one decoded token, a short prefill, a long one
PATHS = ("weight_only", "w8a8", "sparse24", "bf16")
INT_MM_MIN_ROWS = 17  # cuBLASLt's int8 GEMM wants M > 16
CSLT_ROW_MULTIPLE = 32  # cuSPARSELt's int8 dense operand: rows in multiples of 32
TOLERANCE = 0.03  # a candidate's largest error, relative to the product's largest entry
SERVING = "serving"  # config.json's entry: per device name, the table choose_paths measured there


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 of (rows, K) activations: (int8 values, fp32 scales (rows, 1))."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / 127
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def _pad_rows(q: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    rows = max(minimum, math.ceil(len(q) / multiple) * multiple)
    return F.pad(q, (0, 0, 0, rows - len(q))) if rows > len(q) else q


def weight_only(layer: ServingLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.q_weight.to(x.dtype)) * layer.scale.to(x.dtype)


def w8a8(layer: ServingLinear, x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_tokens(x)
    acc = torch._int_mm(_pad_rows(q, 1, INT_MM_MIN_ROWS), layer.q_weight.t())[:len(x)]
    return (acc.float() * s * layer.scale).to(x.dtype)


def sparse24(layer: ServingLinear, x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_tokens(x)
    padded = _pad_rows(q, CSLT_ROW_MULTIPLE, CSLT_ROW_MULTIPLE)
    acc = torch._cslt_sparse_mm(layer.packed24, padded.t(), out_dtype=torch.bfloat16)  # (N, rows): W @ X^T
    return (acc.t()[:len(x)].float() * s * layer.scale).to(x.dtype)


def bf16(layer: ServingLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dense.to(x.dtype))


KERNELS = {"weight_only": weight_only, "w8a8": w8a8, "sparse24": sparse24, "bf16": bf16}


class ServingLinear(nn.Module):
    """A linear layer over an int8 weight (N, K) with fp32 per-row scales, running per call the
    path ``paths`` names for the smallest timed size at least the call's rows (the largest
    beyond). ``prepare(path)`` builds what a path needs beyond the int8 weight (cuSPARSELt's
    packed weight; the dequantized one)."""

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype=torch.bfloat16):
        super().__init__()
        self.register_buffer("q_weight", q_weight.contiguous())
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.dtype = dtype
        self.packed24: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None
        self.paths = {rows: "weight_only" for rows in ROWS}

    @property
    def shape_key(self) -> str:
        n, k = self.q_weight.shape
        return f"{n}x{k}" + ("/2:4" if self.is_24 else "")

    @functools.cached_property
    def is_24(self) -> bool:
        return is_24(self.q_weight)

    def candidates(self) -> list[str]:
        return [p for p in PATHS if p != "sparse24" or self.is_24]

    def prepare(self, path: str) -> None:
        if path == "sparse24" and self.packed24 is None:
            self.packed24 = torch._cslt_compress(self.q_weight)
        if path == "bf16" and self.dense is None:
            self.dense = (self.q_weight.float() * self.scale[:, None]).to(self.dtype)

    def set_paths(self, paths: dict[int, str]) -> None:
        for path in set(paths.values()):
            self.prepare(path)
        self.paths = dict(paths)
        if "sparse24" not in self.paths.values():
            self.packed24 = None
        if "bf16" not in self.paths.values():
            self.dense = None

    def path_for(self, rows: int) -> str:
        sizes = sorted(self.paths)
        return self.paths[next((r for r in sizes if r >= rows), sizes[-1])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = KERNELS[self.path_for(len(flat))](self, flat)
        y = y + self.bias if self.bias is not None else y
        return y.reshape(*x.shape[:-1], -1)


class ServingMoEFFN(nn.Module):
    """The int8 MoE FFN for serving: one token through the chosen experts only (``gathered_ffn``,
    compiled with the model: one GEMV each way over their contiguous blocks) where ``gathered``
    measured faster, and otherwise the dense FFN (``ServingLinear``) with each token's expert mask."""

    def __init__(self, fc_in: ServingLinear, fc_out: ServingLinear, router: nn.Module, topk: int, num_expert: int):
        super().__init__()
        self.fc_in, self.fc_out, self.router, self.topk, self.num_expert = fc_in, fc_out, router, topk, num_expert
        self.size = fc_in.q_weight.shape[0] // num_expert
        self.register_buffer("q_w2t", fc_out.q_weight.T.contiguous())  # expert-major: an expert is a block of rows
        self.top_experts = methods.use("moe").top_experts
        self.gathered = True  # until choose_moe_decode measures it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        chosen, keep = self.top_experts(self.router(flat).float(), self.topk)
        if len(flat) == 1 and self.gathered:
            e, size = self.num_expert, self.size
            out = gathered_ffn(flat[0].float(), self.fc_in.q_weight.view(e, size, -1), self.fc_in.scale.view(e, size),
                               self.fc_in.bias.float().view(e, size), self.q_w2t.view(e, size, -1), self.fc_out.scale,
                               self.fc_out.bias.float(), chosen[0])[None].to(x.dtype)
        else:
            h = torch.relu(self.fc_in(flat)).view(len(flat), self.num_expert, self.size) * keep[:, :, None].to(x.dtype)
            out = self.fc_out(h.flatten(1))
        return out.reshape(x.shape)


def pick_fastest(seconds: dict[str, float]) -> str:
    """The path of least time among those that ran (a failed or wrong candidate times inf)."""
    ran = {path: t for path, t in seconds.items() if math.isfinite(t)}
    if not ran:
        raise RuntimeError(f"no serving path ran: {sorted(seconds)}")
    return min(ran, key=ran.get)


def seconds_per_call(fn, repeats: int = 20) -> float:
    """Median seconds of ``fn()``; on CUDA, replays of a CUDA graph of ten calls (as the served
    model runs), or plain calls where capture fails."""
    fn()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(10):
                    fn()
            run, per = graph.replay, 10
        except RuntimeError:
            run, per = fn, 1
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / per)
        return sorted(times)[len(times) // 2]
    return median_seconds(fn, repeats)


def compiler_settings() -> None:
    """Room for one compilation per layer shape and call size (Dynamo falls back to eager past its
    recompile limit, which would time eager code as compiled); the int8 GEMM's scales fused into
    its epilogue, as torchao does."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._inductor.config.force_fuse_int_mm_with_mul = True


@functools.cache
def _compiled(path: str):
    compiler_settings()
    return torch.compile(KERNELS[path], dynamic=False)


def time_paths(layer: ServingLinear, rows: int, dtype=torch.bfloat16, compile: bool = True) -> dict[str, float]:
    """Seconds per call of each candidate path of ``layer`` for ``rows`` tokens; inf for one that
    fails here or errs beyond TOLERANCE against the exact product of the int8 weight."""
    x = torch.randn(rows, layer.q_weight.shape[1], device=layer.q_weight.device, dtype=dtype)
    exact = x.double() @ (layer.q_weight.double() * layer.scale.double()[:, None]).T
    seconds = {}
    for path in layer.candidates():
        fn = _compiled(path) if compile else KERNELS[path]
        try:
            layer.prepare(path)
            with torch.no_grad():
                err = (fn(layer, x).double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)
                seconds[path] = seconds_per_call(lambda: fn(layer, x)) if err <= TOLERANCE else math.inf
            if err > TOLERANCE:
                print(f"serving path {path} for {layer.shape_key} at {rows} rows errs by {float(err):.2%}: not used")
        except Exception as e:  # noqa: BLE001 - a kernel missing on this device or build: not a candidate
            print(f"serving path {path} for {layer.shape_key} at {rows} rows is not available here "
                  f"({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            seconds[path] = math.inf
    return seconds


def choose_paths(model: nn.Module, rows=ROWS, compile: bool = True, known: dict | None = None) -> dict:
    """Time every candidate for each distinct ServingLinear shape of ``model`` at each call size,
    set every layer's paths to the fastest, and return the table recorded in config.json:
    {"device": name, "paths": {shape: {rows: path}}, "ms": {shape: {rows: {path: ms}}}}. Shapes
    in ``known`` (a table measured on the same device) are taken from it."""
    layers = [m for m in model.modules() if isinstance(m, ServingLinear)]
    table = {"device": _device_name(layers[0].q_weight.device), "paths": {}, "ms": {}}
    for key in (known or {}).get("paths", {}):
        table["paths"][key], table["ms"][key] = known["paths"][key], known["ms"][key]
    for layer in layers:
        key = layer.shape_key
        if key not in table["paths"]:
            times = {r: time_paths(layer, r, compile=compile) for r in rows}
            table["paths"][key] = {str(r): pick_fastest(t) for r, t in times.items()}
            table["ms"][key] = {str(r): {p: round(s * 1e3, 4) for p, s in t.items()} for r, t in times.items()}
            print(f"serving {key}: " + ", ".join(f"{r} rows {p}" for r, p in table["paths"][key].items()))
        layer.set_paths({int(r): p for r, p in table["paths"][key].items()})
    moe = choose_moe_decode(model, compile)
    if moe is not None:
        table["moe_gathered"], table["moe_decode_ms"] = moe
    return table


def choose_moe_decode(model: nn.Module, compile: bool = True) -> tuple[bool, dict] | None:
    """Whether one token runs faster through the chosen experts only (``gathered``) than through
    the masked dense FFN, timed on the first MoE FFN of ``model`` and set on all of them: (the
    choice, ms per path); None without MoE FFNs."""
    ffns = [m for m in model.modules() if isinstance(m, ServingMoEFFN)]
    if not ffns:
        return None
    ffn = ffns[0]
    fn = torch.compile(ffn, dynamic=False) if compile else ffn
    x = torch.randn(1, ffn.fc_in.q_weight.shape[1], device=ffn.q_w2t.device, dtype=ffn.fc_in.dtype)
    ms = {}
    with torch.no_grad():
        for gathered in (False, True):
            ffn.gathered = gathered
            ms["gathered" if gathered else "masked dense"] = round(seconds_per_call(lambda: fn(x)) * 1e3, 4)
    for f in ffns:
        f.gathered = ms["gathered"] < ms["masked dense"]
    return ffns[0].gathered, ms


def apply_paths(model: nn.Module, table: dict) -> None:
    """Set each ServingLinear's paths from a table ``choose_paths`` recorded."""
    for layer in (m for m in model.modules() if isinstance(m, ServingLinear)):
        layer.set_paths({int(r): p for r, p in table["paths"][layer.shape_key].items()})
    for ffn in (m for m in model.modules() if isinstance(m, ServingMoEFFN)):
        ffn.gathered = table.get("moe_gathered", True)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _serving_linear(m: Int8Linear | QLinear, dtype) -> ServingLinear:
    return ServingLinear(m.q_weight, m.scale, m.bias, dtype)


@torch.no_grad()
def to_serving(model: nn.Module, device, dtype=torch.bfloat16) -> nn.Module:
    """``model`` (``load_compressed``'s, or a GPTJ with int8 modules) with every int8 linear layer a
    ServingLinear, every MoE FFN a ServingMoEFFN, the embedding dequantized and the rest in
    ``dtype``, on ``device``. Every layer runs weight_only until ``choose_paths`` or
    ``apply_paths``."""
    for block in model.transformer.h:
        if isinstance(block.mlp, Int8MoEFFN):
            ffn = block.mlp
            fc_in, fc_out = (_serving_linear(m, dtype) for m in (ffn.dense_in, ffn.dense_out))
            block.mlp = ServingMoEFFN(fc_in, fc_out, ffn.router, ffn.topk, ffn.num_expert)
    for name, module in list(model.named_modules()):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(module, (Int8Linear, QLinear)):
            setattr(owner, leaf, _serving_linear(module, dtype))
        elif isinstance(module, Int8Embedding):
            setattr(owner, leaf, nn.Embedding.from_pretrained((module.q_weight.float() * module.scale.float()).to(dtype)))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.to(dtype)
    return model.to(device).eval()


def record_paths(path, device) -> dict:
    """Measure the serving paths of the compressed model at ``path`` on ``device`` and record the
    table in its config.json (under ``serving``, by device name); returns the table."""
    table = choose_paths(to_serving(load_compressed(path), device))
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault(SERVING, {})[table["device"]] = table
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return table


def load_serving(path, device, dtype=torch.bfloat16) -> nn.Module:
    """The compressed model at ``path`` as serving modules on ``device``, each layer on the paths
    recorded for this device's name at export, or measured now where none were."""
    model = to_serving(load_compressed(path), device, dtype)
    recorded = json.loads((Path(path) / "config.json").read_text()).get(SERVING, {})
    table = recorded.get(_device_name(torch.device(device)))
    if table is None:
        print(f"{path}: no serving paths recorded for {_device_name(torch.device(device))}; measuring them now")
        choose_paths(model)
    else:
        apply_paths(model, table)
    return model


class Decoder:
    """Prefill and batch-1 greedy decode of ``model`` over a static KV cache of ``max_len``
    positions. ``compile`` compiles each block (and the head) in place: the blocks share their
    code, so one compilation per call shape serves all of them. On CUDA the decode step is
    captured once as a CUDA graph and replayed per token (what ``mode="reduce-overhead"`` does,
    without tracing the whole model)."""

    def __init__(self, model: nn.Module, max_len: int, compile: bool = True):
        self.model, self.max_len = model, max_len
        self.device = model.transformer.ln_f.weight.device
        model.setup_caches(1, max_len, static=True)
        if compile:
            compiler_settings()
            for module in (*model.transformer.h, model.lm_head):
                module.compile(dynamic=False)
        self.decode = self._graphed() if self.device.type == "cuda" else self.step

    def step(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(ids, input_pos=input_pos)

    def _graphed(self):
        ids, pos = torch.zeros(1, 1, dtype=torch.long, device=self.device), torch.zeros(1, dtype=torch.long,
                                                                                         device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture; the prefill rewrites position 0
            for _ in range(3):
                self.step(ids, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.step(ids, pos)

        def replay(new_ids: torch.Tensor, new_pos: torch.Tensor) -> torch.Tensor:
            ids.copy_(new_ids)
            pos.copy_(new_pos)
            graph.replay()
            return logits
        return replay

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The ``new_tokens`` greedy tokens (1, new_tokens) after ``prompt`` (1, T)."""
        T = prompt.shape[1]
        if T + new_tokens > self.max_len:
            raise ValueError(f"{T} prompt tokens + {new_tokens} new ones exceed the cache's {self.max_len} positions")
        logits = self.step(prompt.to(self.device), torch.arange(T, device=self.device))
        out = [logits[:, -1:].argmax(-1)]
        for pos in range(T, T + new_tokens - 1):
            logits = self.decode(out[-1], torch.tensor([pos], device=self.device))
            out.append(logits[:, -1:].argmax(-1))
        return torch.cat(out, dim=1)
