"""Cached decoding's attention in one C call per layer: for one new token of one sequence, the
rotary embedding, the KV-cache write and the attention over the cache
(``kernels.moe_gemv.attend_one``) instead of some forty torch calls, whose dispatch is most of a
small model's decoding step. Serving only: the training stages never swap it in."""
from __future__ import annotations

import torch

from kernels import moe_gemv
from pipeline.models.gptj import Attention


class CachedAttention(Attention):
    """``Attention`` whose one-token cached steps (batch 1, fp32 on the CPU, a cache that is not
    static) run in C; every other call as ``Attention``."""

    def forward(self, x, cos, sin, probs_out=None, input_pos=None):
        cache = getattr(self, "kv_cache", None)
        if (input_pos is None or probs_out is not None or x.shape[:2] != (1, 1) or x.dtype != torch.float32
                or x.device.type != "cpu" or cache.static):
            return super().forward(x, cos, sin, probs_out, input_pos)
        q, k, v = (proj(x).reshape(self.n_head, self.head_dim).contiguous()
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = moe_gemv.attend_one(q, k, v, cos[0], sin[0], cache.k[0], cache.v[0], int(input_pos[0]))
        return self.out_proj(y.view(1, 1, -1))


def use_c_attention(model: torch.nn.Module) -> bool:
    """Every attention layer of ``model`` made a ``CachedAttention`` (in place, the same
    parameters), where the C kernels exist here; returns whether they do."""
    if not moe_gemv.available():
        return False
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = CachedAttention  # the same state; only the forward changes
    return True
