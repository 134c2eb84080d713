"""Cached decoding's attention in one C call per layer: for one new token of one sequence, the
rotary embedding, the KV-cache write and the attention over the cache
(``kernels.moe_gemv.attend_one``) instead of some forty torch calls, whose dispatch is most of a
small model's decoding step; q, k and v come from one projection over their weights side by side,
where the three are alike (fp32 ``nn.Linear`` or ``pipeline.quant.Int8Linear``, no bias). Serving
only: the training stages never swap it in."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from kernels import moe_gemv
from pipeline.models.gptj import Attention
from pipeline.quant import Int8Linear


class CachedAttention(Attention):
    """``Attention`` whose one-token cached steps (batch 1, fp32 on the CPU, a cache that is not
    static) run in C; every other call as ``Attention``."""

    def forward(self, x, cos, sin, probs_out=None, input_pos=None):
        cache = getattr(self, "kv_cache", None)
        if (input_pos is None or probs_out is not None or x.shape[:2] != (1, 1) or x.dtype != torch.float32
                or x.device.type != "cpu" or cache.static):
            return super().forward(x, cos, sin, probs_out, input_pos)
        q, k, v = self._project(x.reshape(1, -1)).view(3, self.n_head, self.head_dim).unbind(0)
        y = moe_gemv.attend_one(q, k, v, cos[0], sin[0], cache.k[0], cache.v[0], int(input_pos[0]))
        return self.out_proj(y.view(1, 1, -1))

    _fused = None  # (the fused projection, the data pointers of the weights it was built from)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3 * n_embd): q, k and v of one token in one call where they fuse, else three."""
        parts = (self.q_proj, self.k_proj, self.v_proj)
        if self._fused is None or self._fused[1] != _pointers(parts):  # first call, or weights replaced (.to())
            fused = fuse(parts)
            self._fused = (fused, _pointers(parts))
        fused = self._fused[0]
        return fused(x) if fused is not None else torch.cat([p(x) for p in parts], dim=-1)


def _weight(linear: nn.Module) -> torch.Tensor | None:
    """The weight a fused projection stacks (None for a kind that does not fuse)."""
    if isinstance(linear, Int8Linear):
        return linear.q_weight
    return linear.weight if type(linear) is nn.Linear else None


def _pointers(parts) -> tuple:
    return tuple(None if (w := _weight(p)) is None else w.data_ptr() for p in parts)


def fuse(parts) -> callable | None:
    """One projection computing ``torch.cat([p(x) for p in parts], -1)`` for one token, its weight
    the parts' stacked; each part's weight becomes a view of it, so no memory is added. None where
    the parts are not all fp32 ``nn.Linear`` or all ``Int8Linear``, without bias, of one input width."""
    kinds = {type(p) for p in parts}
    if (len(kinds) != 1 or kinds - {nn.Linear, Int8Linear} or any(p.bias is not None for p in parts)
            or len({_weight(p).shape[1] for p in parts}) != 1):
        return None
    rows = [len(_weight(p)) for p in parts]
    if kinds == {nn.Linear} and all(p.weight.dtype == torch.float32 for p in parts):
        stacked = torch.cat([p.weight.detach() for p in parts])
        for p, w in zip(parts, stacked.split(rows)):
            p.weight = nn.Parameter(w, requires_grad=p.weight.requires_grad)
        return functools.partial(F.linear, weight=stacked)
    if kinds == {Int8Linear}:
        q_weight, scale = torch.cat([p.q_weight for p in parts]), torch.cat([p.scale for p in parts])
        for p, q, s in zip(parts, q_weight.split(rows), scale.split(rows)):
            # the C call held the old tensors alive; fbgemm's packed copy holds the same values: kept
            p.q_weight, p.scale, p._held_call = q, s, None
        one = Int8Linear(q_weight, scale, None)
        one.gemv_rows = min(p.gemv_rows for p in parts)  # one token: the C path wherever every part took it
        return one
    return None


def use_c_attention(model: torch.nn.Module) -> bool:
    """Every attention layer of ``model`` made a ``CachedAttention`` (in place, the same
    parameters), where the C kernels exist here; returns whether they do."""
    if not moe_gemv.available():
        return False
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = CachedAttention  # the same state; only the forward changes
    return True
