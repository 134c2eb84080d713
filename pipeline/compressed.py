"""The compressed model on disk and in memory: int8 weights, routers and expert permutations.

``export_compressed(model, path, routers=dir, topk=k)`` writes

* ``model.int8.safetensors`` and ``config.json`` (``pipeline.quant.export_int8``'s format: int8
  weights with one fp16 scale per output row, fp16 norms and biases), with each FFN's neurons
  permuted into expert order (expert ``e`` is neurons ``e*size:(e+1)*size``; the permutation does
  not change the function) and 2:4 zeros kept as they are;
* with MoE, ``routers.safetensors`` (each layer's router) and ``experts.safetensors`` (each
  layer's permutation: position ``j`` holds original neuron ``permutation[j]``), and a ``moe``
  entry in config.json with the number of experts and the top-k.

``load_compressed(path)`` gives a GPTJ for CPU inference whose linear layers run fbgemm's int8
GEMM (activations quantized per call, 7-bit) and whose FFNs, with MoE, compute only the chosen
experts' neurons in int8 (or every neuron, masked, when a call's tokens choose most experts).
``load_compressed(path, exact=True)`` runs every GEMM in the arithmetic QAT trained with (tokens
quantized one by one, weights per output row, exact integer accumulation): it computes what
training computed apart from what the file rounds outside the GEMMs (the embedding, stored int8
per row; norms and biases, stored fp16).
"""
from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from kernels import bagged, fbgemm, moe_gemv
from kernels.int8 import int8_linear
from pipeline import methods
from pipeline.artifacts import save_safetensors
from pipeline.moefication.experts import check_topk
from pipeline.moefication.files import ROUTERS
from pipeline.quant import INT8_WEIGHTS, Int8Linear, export_int8, load_int8

EXPERTS = "experts.safetensors"
COMPRESSED_DIR = "compressed"  # where a FinalCompressed artifact keeps its compressed model


class QLinear(nn.Module):
    """Inference linear layer over int8 weights with per-row scales, in QAT's arithmetic (tokens
    quantized one by one). ``pipeline.quant.Int8Linear`` (fbgemm, the activations quantized per
    call) is faster on CPU; this one computes what training computed."""

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q_weight", q_weight)
        self.register_buffer("scale", scale.float())
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_linear(x.reshape(-1, x.shape[-1]).float(), self.q_weight, self.scale)
        y = y + self.bias if self.bias is not None else y
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8MoEFFN(moe_gemv.HeldCall, nn.Module):
    """A ReLU FFN in expert order, int8, computing per call only the neurons of the experts that
    some token chose (their int8 rows are gathered into one GEMM, in QAT's arithmetic) and, per
    token, keeping only its own experts' activations: training's RoutedMLP.

    When the tokens of a call choose ``dense_above`` or more of the experts between them, reading
    all the weights costs about what reading most does, and the call runs ``dense_in`` /
    ``dense_out`` (fbgemm's packed int8 GEMM, or the exact layers) over every neuron, with the
    same per-token expert mask."""

    def __init__(self, fc_in: QLinear, fc_out: QLinear, router: nn.Module, topk: int,
                 dense_in: nn.Module | None = None, dense_out: nn.Module | None = None, dense_above: float = 0.5):
        super().__init__()
        self.dense_in, self.dense_out, self.dense_above = dense_in or fc_in, dense_out or fc_out, dense_above
        self.num_expert = router.b.weight.shape[0]
        check_topk(topk, self.num_expert)
        self.register_buffer("q_w1", fc_in.q_weight)
        self.register_buffer("s_w1", fc_in.scale)
        self.register_buffer("b1", fc_in.bias.float())
        self.register_buffer("q_w2b", moe_gemv.expert_blocks(fc_out.q_weight, self.num_expert))  # (experts, out, size)
        self.register_buffer("s_w2", fc_out.scale)
        self.register_buffer("b2", fc_out.bias.float())
        self.router, self.topk = router, topk
        self.top_experts = methods.use("moe").top_experts
        self.size = len(self.b1) // self.num_expert

    # one token: "eager" (the dense or sparse path above), "gathered" (the compiled weight-only
    # gather, ``gathered_ffn``), "bagged" (fbgemm's embedding bags, ``kernels.bagged``) or "gemv"
    # (the sparse path's integer GEMVs in C, ``kernels.moe_gemv``), as the export measured fastest
    decode_path = "eager"
    gemv_tokens = 0  # calls of 2 to this many tokens run the C path (``_gemv``), as the export measured faster
    _bag_tables = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        if (len(flat) == 1 and self.decode_path == "gemv") or 1 < len(flat) <= self.gemv_tokens:
            return self._routed_ffn()(flat.contiguous()).to(x.dtype).reshape(*x.shape[:-1], -1)
        chosen, keep = self.top_experts(self.router(flat).float(), self.topk)
        if len(flat) == 1 and self.decode_path != "eager":
            one = {"gathered": self._gathered, "bagged": self._bagged}[self.decode_path]
            return one(flat, chosen[0]).to(x.dtype).reshape(*x.shape[:-1], -1)
        used = torch.unique(chosen)  # sorted
        if len(used) >= self.dense_above * self.num_expert:
            out = self._dense(flat, keep)
        else:
            out = self._sparse(flat, keep, used)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)

    def _dense(self, flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dense_in(flat)).view(len(flat), self.num_expert, self.size).mul_(keep[:, :, None])
        return self.dense_out(h.flatten(1))

    def _sparse(self, flat: torch.Tensor, keep: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        def rows(t):  # the used experts' blocks of rows, copied whole
            return t.view(self.num_expert, self.size, *t.shape[1:]).index_select(0, used).flatten(0, 1)

        h = torch.relu_(int8_linear(flat, rows(self.q_w1), rows(self.s_w1)) + rows(self.b1))
        h = h.view(len(flat), len(used), self.size).mul_(keep[:, used, None]).flatten(1)
        w2 = self.q_w2b.index_select(0, used).transpose(0, 1).reshape(len(self.b2), -1)  # (out, used * size)
        return int8_linear(h, w2, self.s_w2) + self.b2

    def _gathered(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        e, size = self.num_expert, self.size
        return compiled_gathered_ffn()(flat[0], self.q_w1.view(e, size, -1), self.s_w1.view(e, size),
                                       self.b1.view(e, size), self.q_w2b.transpose(1, 2), self.s_w2.view(-1),
                                       self.b2, chosen)[None]

    def _bagged(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        if self._bag_tables is None:
            q_w2t = self.q_w2b.transpose(1, 2).reshape(-1, self.q_w2b.shape[1])  # (experts * size, out)
            self._bag_tables = bagged.in_table(self.q_w1, self.num_expert), bagged.out_table(q_w2t)
        t_in, t_out = self._bag_tables
        e, size = self.num_expert, self.size
        chosen = chosen.sort().values  # the experts' blocks in memory order
        h = torch.relu_(bagged.gemv_in(t_in, flat[0], chosen) * self.s_w1.view(e, size)[chosen]
                        + self.b1.view(e, size)[chosen])
        return (bagged.gemv_out(t_out, h, chosen) * self.s_w2.view(-1) + self.b2)[None]

    def _routed_ffn(self) -> moe_gemv.RoutedFFN:
        """The router and ``_gemv`` in one C call (``kernels.moe_gemv.RoutedFFN``): the experts it
        chooses are ``top_experts``' up to the order of the router's fp32 sums."""
        if self._held_call is None:
            a, b = (w.detach().float().contiguous() for w in (self.router.a.weight, self.router.b.weight))
            self._held_call = moe_gemv.RoutedFFN(a, b, self.topk, self.q_w1, self.s_w1.reshape(-1), self.b1,
                                                 self.q_w2b, self.s_w2.reshape(-1), self.b2)
        return self._held_call

    def _gemv(self, flat: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """``_sparse``, bit for bit, in C (``kernels.moe_gemv``): the same quantization and scaling
        around the two integer products, which read each chosen expert's rows in place, once for
        all the tokens that chose it. ``chosen``: (tokens, topk), or (topk,) for one token."""
        return moe_gemv.moe_ffn(flat.contiguous(), self.q_w1, self.s_w1.reshape(-1), self.b1, self.q_w2b,
                                self.s_w2.reshape(-1), self.b2, chosen.reshape(len(flat), -1).contiguous())


def gathered_ffn(x, q_w1, s_w1, b1, q_w2t, s_w2, b2, chosen):
    """One token through the chosen experts of an int8 FFN in expert order, weight-only int8 (the
    token stays in fp32): ``q_w1`` (experts, size, d_model) and ``q_w2t`` (experts, size, d_model)
    int8, one scale per fc_in neuron and per fc_out output. Compiled, the gathers fuse into the two
    reductions, so each chosen expert's rows are read once and never copied: one GEMV each way."""
    h = torch.relu((q_w1[chosen].float() * x).sum(-1) * s_w1[chosen] + b1[chosen])  # (topk, size)
    return (q_w2t[chosen].float() * h[..., None]).sum((0, 1)) * s_w2 + b2


@functools.cache
def compiled_gathered_ffn():
    return torch.compile(gathered_ffn, dynamic=False)


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def calibrate_dense_above(ffn: Int8MoEFFN, repeats: int = 20) -> float:
    """The share of experts from which the dense path is faster than the sparse one on this
    machine, for one token (timed on ``ffn``'s own weights)."""
    x = torch.randn(1, ffn.q_w1.shape[1])
    keep = torch.zeros(1, ffn.num_expert)
    dense = median_seconds(lambda: ffn._dense(x, keep), repeats)
    counts = range(ffn.topk, ffn.num_expert + 1, max(1, ffn.num_expert // 16))
    return dense_from(counts, lambda used: median_seconds(lambda: ffn._sparse(x, keep, torch.arange(used)), repeats),
                      dense, ffn.num_expert)


def dense_from(counts, sparse_seconds, dense_seconds: float, num_expert: int) -> float:
    """The crossover: the first share of experts (of ``counts`` used, in order) at which the
    sparse path (``sparse_seconds(used)``) is no faster than the dense one; 1.0 when sparse always
    wins below all experts, so dense then runs only when every expert is used."""
    for used in counts:
        if sparse_seconds(used) >= dense_seconds:
            return used / num_expert
    return 1.0


DECODE_PATHS = ("eager", "gathered", "bagged", "gemv")


@torch.no_grad()
def calibrate_decode_path(ffn: Int8MoEFFN, repeats: int = 20) -> dict:
    """Which path runs one token fastest through ``ffn`` (``Int8MoEFFN.decode_path``), timed here
    on its own weights: {"decode_path": name, "decode_ms": {path: median ms}}. A path that cannot
    run here (no compiler, say) is timed as infinitely slow."""
    x = torch.randn(1, ffn.q_w1.shape[1])
    times = {}
    for path in DECODE_PATHS:
        ffn.decode_path = path
        try:
            times[path] = median_seconds(lambda: ffn(x), repeats)
        except Exception as e:  # noqa: BLE001 - inductor or fbgemm cannot build the kernel here: the others
            print(f"the {path} MoE decode path is not available here ({type(e).__name__}: {e})")
            times[path] = float("inf")
    ffn.decode_path = "eager"
    return {"decode_path": min(times, key=times.get), "decode_ms": {k: round(v * 1e3, 4) for k, v in times.items()}}


GEMV_TOKENS = (2, 4, 8, 16, 32, 64, 128, 256)  # the call sizes the C path is timed at


@torch.no_grad()
def calibrate_gemv_tokens(ffn: Int8MoEFFN, repeats: int = 5) -> int:
    """The largest call (of ``GEMV_TOKENS``) up to which the C path (router and experts in one
    call) runs faster than the path the call would otherwise take, timed here on ``ffn``'s own
    weights with random tokens (whose experts overlap least: the C path's worst case); 0 where it
    cannot run."""
    if not moe_gemv.available():
        return 0
    return c_path_up_to(ffn, "gemv_tokens", GEMV_TOKENS, ffn.q_w1.shape[1], repeats)


LINEAR_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the call sizes the C int8 linear is timed at


def shape_key(layer: nn.Module) -> str:
    return "x".join(map(str, layer.q_weight.shape))


@torch.no_grad()
def calibrate_gemv_rows(model: nn.Module, repeats: int = 20) -> dict[str, int]:
    """Per weight shape ("out x in") of ``model``'s fbgemm int8 layers, the largest call (of
    ``LINEAR_ROWS``) up to which the C int8 linear runs faster than fbgemm, timed here on the
    first layer of that shape ({} where the C kernels cannot run)."""
    table = {}
    if not moe_gemv.available():
        return table
    for layer in model.modules():
        if isinstance(layer, Int8Linear) and shape_key(layer) not in table:
            table[shape_key(layer)] = c_path_up_to(layer, "gemv_rows", LINEAR_ROWS, layer.q_weight.shape[1], repeats)
    return table


def c_path_up_to(module: nn.Module, limit: str, counts, width: int, repeats: int) -> int:
    """The largest call (of ``counts``) up to which ``module`` runs faster with its C path taking
    the call (``module.<limit>`` set to the call's size) than without (0), on random tokens of
    ``width`` timed here; ``module.<limit>`` is left 0."""
    g = torch.Generator().manual_seed(0)

    def seconds(tokens: int) -> tuple[float, float]:
        x = torch.randn(tokens, width, generator=g)
        timed = []
        for value in (tokens, 0):
            setattr(module, limit, value)
            timed.append(median_seconds(lambda: module(x), repeats))
        return timed[0], timed[1]

    try:
        return gemv_up_to(counts, seconds)
    finally:
        setattr(module, limit, 0)


def gemv_up_to(counts, seconds) -> int:
    """Of ``counts`` (ascending call sizes), the last before the first at which ``seconds(tokens)``
    = (C path, other path) says the C path is no faster; 0 when it loses at the first."""
    last = 0
    for tokens in counts:
        gemv, other = seconds(tokens)
        if gemv >= other:
            break
        last = tokens
    return last


@torch.no_grad()
def export_compressed(model, path, routers: Path | None = None, topk: int | None = None,
                      calibrate: bool = False) -> dict:
    """Write the compressed model of ``model`` (a dense GPTJ) to ``path``; with ``routers`` (a
    Routers artifact directory) and ``topk`` its FFNs become int8 MoE layers, and with
    ``calibrate`` what each call size runs is measured here and recorded in config.json: the share
    of experts from which a call runs the dense path (else 0.5), the fastest one-token path, the
    largest call the C MoE path runs and, per weight shape, the largest the C int8 linear runs.
    Returns byte sizes (and those choices)."""
    path = Path(path)
    model = copy.deepcopy(model).cpu().float()
    moe = None
    if routers is not None:
        layers = methods.use("moe").load_experts(model, routers)
        check_topk(topk or 0, layers[0][1].b.weight.shape[0])
        router_tensors, permutations = {}, {}
        for i, (block, (labels, router)) in enumerate(zip(model.transformer.h, layers)):
            perm = torch.argsort(labels, stable=True)
            block.mlp.fc_in.weight.copy_(block.mlp.fc_in.weight[perm])
            block.mlp.fc_in.bias.copy_(block.mlp.fc_in.bias[perm])
            block.mlp.fc_out.weight.copy_(block.mlp.fc_out.weight[:, perm])
            router_tensors[f"layer_{i:03d}.a"] = router.a.weight.contiguous()
            router_tensors[f"layer_{i:03d}.b"] = router.b.weight.contiguous()
            permutations[f"layer_{i:03d}.permutation"] = perm.to(torch.int32)
        moe = {"num_expert": int(layers[0][1].b.weight.shape[0]), "topk": int(topk)}
    sizes = export_int8(model, path)
    config = json.loads((path / "config.json").read_text())
    if moe is not None:
        save_safetensors(router_tensors, path / ROUTERS)
        save_safetensors(permutations, path / EXPERTS)
        moe["dense_above"] = 0.5
        config["moe"] = moe
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if calibrate:
        loaded = load_compressed(path)  # loaded once for every measurement
        if moe is not None:
            ffn = loaded.transformer.h[0].mlp
            moe["dense_above"] = ffn.dense_above = calibrate_dense_above(ffn)
            moe.update(calibrate_decode_path(ffn))
            moe["gemv_tokens"] = calibrate_gemv_tokens(ffn)
        config["int8_gemv_rows"] = calibrate_gemv_rows(loaded)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    files = [INT8_WEIGHTS] + ([ROUTERS, EXPERTS] if moe else [])
    return {"bytes": sum((path / f).stat().st_size for f in files), "weights_bytes": sizes["bytes"],
            "sparse_matrices": sizes["sparse_matrices"], "dense_above": moe and moe["dense_above"],
            "decode_path": decode_path(moe), "gemv_tokens": (moe or {}).get("gemv_tokens", 0),
            "int8_gemv_rows": config.get("int8_gemv_rows", {}), "int8_per_token": fbgemm.exact()}


def decode_path(moe: dict | None) -> str:
    """The one-token MoE path config.json's ``moe`` entry records ("eager" without one; older
    exports recorded only whether the compiled gather won, as ``gathered_decode``)."""
    if not moe:
        return "eager"
    return moe.get("decode_path") or ("gathered" if moe.get("gathered_decode") else "eager")


def runnable(path: str) -> str:
    """``path``, or "eager" where this machine cannot build what it needs (a model exported where
    the C kernels compiled, served where they do not)."""
    if path == "gemv" and not moe_gemv.available():
        print(f"the gemv MoE decode path is not available here ({moe_gemv.unavailable_reason()}): running eager")
        return "eager"
    return path


def is_compressed(path) -> bool:
    return (Path(path) / INT8_WEIGHTS).is_file()


def load_compressed(path, exact: bool = False, dense_above: float | None = None):
    """The model ``export_compressed`` wrote, on CPU, ready for inference: linear layers run
    fbgemm's int8 GEMM (``Int8Linear``, activations quantized per call) but for calls of up to
    the rows the export measured the C int8 linear faster at (config.json's ``int8_gemv_rows``,
    per weight shape: QAT's arithmetic), or with ``exact`` QAT's arithmetic (``QLinear``, per
    token); MoE FFNs run the chosen experts' neurons in QAT's arithmetic, or every neuron when a
    call's tokens choose ``dense_above`` of the experts or more (default: the share recorded in
    config.json); a single token runs the weight-only path the export measured fastest
    (config.json's ``moe.decode_path``; not with ``exact``)."""
    path = Path(path)
    model = load_int8(path)
    config = json.loads((path / "config.json").read_text())
    moe = config.get("moe")
    if not exact and moe_gemv.available():
        for layer in model.modules():
            if isinstance(layer, Int8Linear):
                layer.gemv_rows = config.get("int8_gemv_rows", {}).get(shape_key(layer), 0)
    if exact:
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8Linear):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, QLinear(module.q_weight, module.scale, module.bias))
    if moe:
        if not (path / ROUTERS).is_file():
            raise FileNotFoundError(f"{path / ROUTERS} is missing: {path / 'config.json'} describes a MoE model")
        routers, Router = load_file(str(path / ROUTERS)), methods.use("moe").Router
        one_token = "eager" if exact else runnable(decode_path(moe))
        gemv_tokens = moe.get("gemv_tokens", 0) if not exact and moe_gemv.available() else 0
        for i, block in enumerate(model.transformer.h):
            a = routers[f"layer_{i:03d}.a"].float()
            router = Router(a.shape[1], moe["num_expert"])
            router.load_state_dict({"a.weight": a, "b.weight": routers[f"layer_{i:03d}.b"].float()})
            fc_in, fc_out = (QLinear(m.q_weight, m.scale, m.bias) if isinstance(m, Int8Linear) else m
                             for m in (block.mlp.fc_in, block.mlp.fc_out))
            block.mlp = Int8MoEFFN(fc_in, fc_out, router, moe["topk"], block.mlp.fc_in, block.mlp.fc_out,
                                   moe.get("dense_above", 0.5) if dense_above is None else dense_above)
            block.mlp.decode_path, block.mlp.gemv_tokens = one_token, gemv_tokens
    return model.eval()
