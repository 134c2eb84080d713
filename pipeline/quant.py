"""BMQuant: quantization-aware training with the int8 GEMM, and the real int8 model it exports.

``BMQuant.quantize(model)`` replaces every linear layer (or those whose qualified name matches
one of ``patterns``) by a ``QATLinear`` holding the same parameters; training then runs the int8
forward and the straight-through backward of ``kernels.bmm``. ``export_int8`` writes int8 weights with one
fp16 scale per output row; ``load_int8`` gives back a model whose linear layers run a real int8
kernel (fbgemm's on CPU, cuBLASLt's ``torch._int_mm`` on GPU).
"""
from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernels import fbgemm, moe_gemv
from kernels.gemm import GRADS, linear
from kernels.int8 import int8_linear, scale_and_quantize
from pipeline import sparse24
from pipeline.models.config import GPTJConfig, checkpoint_config
from pipeline.models.gptj import GPTJ

INT8_WEIGHTS = "model.int8.safetensors"
FORMAT = "bmcook-pipeline-int8/2"  # /2: 2:4-sparse matrices stored as kept values and positions


class QATLinear(nn.Linear):
    """A linear layer trained quantization-aware: the int8 GEMM forward (``kernels.linear``) with
    the ``grad`` backward, "float" (straight-through in fp32) or "int8" (cpm_kernels')."""

    def __init__(self, linear: nn.Linear, grad: str):
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias, self.grad = linear.weight, linear.bias, grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, int8=True, grad=self.grad)


class BMQuant:
    @staticmethod
    def quantize(model: nn.Module, patterns: list[str] | None = None, grad: str = "float") -> list[str]:
        """Replace linear layers by ``QATLinear`` (the same parameters, on the int8 path); returns
        the names replaced. ``patterns`` are fnmatch patterns over qualified module names
        (default: every linear layer). ``grad``: the backward, "float" or "int8"."""
        if grad not in GRADS:
            raise ValueError(f"BMQuant.quantize: grad {grad!r} is not one of {', '.join(GRADS)}")
        chosen = []
        for name, module in model.named_modules():
            if patterns is None:
                if isinstance(module, nn.Linear):
                    chosen.append(name)
            elif any(fnmatch.fnmatchcase(name, p) for p in patterns):
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"BMQuant.quantize: module '{name}' ({type(module).__name__}) is not a "
                                     f"linear layer with a weight, so it cannot run in int8")
                chosen.append(name)
        if not chosen:
            raise ValueError(f"BMQuant.quantize: no linear layer matches {patterns or 'any name'}")
        for name in chosen:
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, leaf, QATLinear(getattr(owner, leaf), grad))
        return chosen


class Int8Linear(moe_gemv.HeldCall, nn.Module):
    """Inference-only linear layer holding int8 weights with per-row fp16 scales.

    On CPU the product runs in fbgemm's int8 GEMM on weights packed once at load time, the tokens
    quantized one by one as in training where fbgemm sums exactly (``kernels.fbgemm``), or for calls of up to
    ``gemv_rows`` tokens (as the export measured faster) in QAT's arithmetic in C
    (``kernels.moe_gemv.Int8Linear``: tokens quantized one by one); on CUDA tokens are quantized
    per row as in training and the product runs in cuBLASLt's int8 GEMM."""

    gemv_rows = 0

    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q_weight", q_weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self._packed = None

    def _fbgemm(self):
        if self._packed is None:
            self._packed = fbgemm.pack(self.q_weight, self.scale)
        return self._packed

    def _gemv(self) -> moe_gemv.Int8Linear:
        if self._held_call is None:
            bias = None if self.bias is None else self.bias.float().contiguous()
            self._held_call = moe_gemv.Int8Linear(self.q_weight, self.scale.float().reshape(-1), bias)
        return self._held_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, x.shape[-1]).float().contiguous()
            y = self._gemv()(flat) if len(flat) <= self.gemv_rows else fbgemm.linear(flat, self._fbgemm(), self.bias)
            return y.to(x.dtype).reshape(*x.shape[:-1], -1)
        y = int8_linear(x.reshape(-1, x.shape[-1]), self.q_weight, self.scale, fp16=True)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y + self.bias.to(x.dtype) if self.bias is not None else y


class Int8Embedding(nn.Module):
    def __init__(self, q_weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q_weight", q_weight)
        self.register_buffer("scale", scale.reshape(-1, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.q_weight).float() * self.scale[ids].float()


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, in) as int8 with one fp16 scale per row: the training forward's arithmetic."""
    scale, q = scale_and_quantize(w, dim=1)
    return q, scale.reshape(-1)


def export_int8(model: GPTJ, path: Path) -> dict:
    """Write ``config.json`` and the int8 weights (int8 + fp16 per-row scale for every linear layer
    and the embedding, fp16 for LayerNorms and biases; a linear layer whose int8 weight is 2:4
    sparse along its rows as its kept values and their positions, ``pipeline.sparse24``). Returns
    the byte size written and the number of matrices stored 2:4."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, sparse = {}, 0
    quantized = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} | {"transformer.wte"}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            q, s = quantize_rows(t.detach().float())
            tensors[f"{module}.scale"] = s.contiguous()
            packed = sparse24.pack(q) if module != "transformer.wte" else None
            if packed is None:
                tensors[f"{module}.q_weight"] = q.contiguous()
            else:
                tensors[f"{module}.q_values"], tensors[f"{module}.q_index"] = packed
                sparse += 1
        else:
            tensors[name] = t.detach().half().contiguous()
    save_file(tensors, str(path / INT8_WEIGHTS), metadata={"format": FORMAT})
    config = model.config.to_hf_dict() | {"quantization": {
        "format": FORMAT, "weights": "int8, per-row fp16 scale; 2:4-sparse ones as kept values and 2-bit positions"}}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"bytes": (path / INT8_WEIGHTS).stat().st_size, "sparse_matrices": sparse}


def load_int8(path: Path) -> GPTJ:
    """A GPTJ whose linear layers and embedding are int8 modules, from ``export_int8``'s output."""
    path = Path(path)
    config: GPTJConfig = checkpoint_config(path, weight_files=(INT8_WEIGHTS,))
    tensors = load_file(str(path / INT8_WEIGHTS))
    with torch.device("meta"):
        model = GPTJ(config)
    for name, module in list(model.named_modules()):
        if f"{name}.q_values" in tensors:  # stored 2:4
            tensors[f"{name}.q_weight"] = sparse24.unpack(tensors.pop(f"{name}.q_values"), tensors.pop(f"{name}.q_index"))
        if f"{name}.q_weight" not in tensors:
            continue
        q, s = tensors.pop(f"{name}.q_weight"), tensors.pop(f"{name}.scale")
        if isinstance(module, nn.Embedding):
            new = Int8Embedding(q, s)
        else:
            bias = tensors.pop(f"{name}.bias", None)
            new = Int8Linear(q, s, bias.float() if bias is not None else None)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    rest = {k: v for k, v in model.state_dict().items() if v.is_meta}
    if set(rest) != set(tensors):
        wrong = sorted(set(rest) ^ set(tensors))[0]
        raise ValueError(f"{path / INT8_WEIGHTS}: tensor '{wrong}' is missing or unexpected for this config.json")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False, assign=True)
    model.reset_rope_()
    return model.eval()
