"""GPT-J decoder-only transformer.

Module and parameter names match transformers' GPTJForCausalLM, so Hugging Face
state dicts load 1:1 (see hf.py).
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.losses import lm_and_soft_ce

from .config import GPTJConfig


def rotary_table(n_positions, rotary_dim, base=10000.0):
    """cos/sin table of shape (2, n_positions, rotary_dim).

    GPT-J rotates interleaved pairs of dims (0,1), (2,3), ... so each frequency is
    repeated twice along the last axis.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    angles = torch.arange(n_positions).float()[:, None] * inv_freq[None, :]
    angles = angles.repeat_interleave(2, dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rotary(x, cos, sin):
    """Rotate the first cos.shape[-1] dims of every head. x: (B, T, H, hd); cos/sin: (T, rotary_dim)."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)  # (x0, x1) -> (-x1, x0) for every pair
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, cos, sin, probs_out=None, input_pos=None):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, T, hd)
        mask, causal = None, True
        if input_pos is not None:  # decoding: these tokens' keys and values join the cache's
            k, v, mask = self.kv_cache.update(input_pos, k, v)
            causal = False
        # like HF, attention is computed in fp32 so fp16 models do not overflow (autocast would cast it back)
        if probs_out is None:
            with torch.autocast(x.device.type, enabled=False):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        else:  # distillation wants the attention probabilities themselves
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            probs_out.append(probs)
            y = probs @ v
        y = y.to(x.dtype).transpose(1, 2).reshape(B, T, D)
        return self.out_proj(y)


class KVCache:
    """A layer's keys and values for positions 0 .. max_len - 1, preallocated (fp32, as attention
    computes). ``update`` writes new tokens at their positions and returns the keys and values up
    to the last of them, with the mask of which each new token may attend to (None when every new
    token attends to all of them: one token, or a prefill from position 0). A ``static`` cache
    always returns all max_len positions with the mask: shapes that never change and no read of
    the positions on the host, as CUDA graphs need (``pipeline.serving``)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device, static: bool = False):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, device=device)
        self.v = torch.zeros_like(self.k)
        self.static = static

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k[:, :, input_pos], self.v[:, :, input_pos] = k, v
        if self.static:
            return self.k, self.v, torch.arange(self.k.shape[2], device=k.device)[None, :] <= input_pos[:, None]
        end = int(input_pos[-1]) + 1
        keys, values = self.k[:, :, :end], self.v[:, :, :end]
        if len(input_pos) == 1:
            return keys, values, None
        mask = torch.arange(end, device=k.device)[None, :] <= input_pos[:, None]  # (T, end): causal
        return keys, values, mask


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.n_embd, config.n_inner)
        self.fc_out = nn.Linear(config.n_inner, config.n_embd)
        self.activation = config.activation

    def forward(self, x):
        x = self.fc_in(x)
        if self.activation == "relu":
            x = F.relu(x)
        else:
            x = F.gelu(x, approximate="tanh")  # 'gelu_new'
        return self.fc_out(x)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, probs_out=None, input_pos=None):
        # GPT-J: attention and MLP run in parallel on the same normalised input
        h = self.ln_1(x)
        return self.attn(h, cos, sin, probs_out, input_pos) + self.mlp(h) + x


class GPTJ(nn.Module):
    def __init__(self, config: GPTJConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        # derived from the config, so not saved in checkpoints
        self.register_buffer("rope", rotary_table(config.n_positions, config.rotary_dim), persistent=False)
        self.init_weights_()

    @torch.no_grad()
    def init_weights_(self, seed=None):
        """Init for training from scratch: N(0, 0.02) weights, zero biases, LayerNorm ones/zeros."""
        if self.lm_head.weight.is_meta:  # built on the meta device to be filled by a checkpoint
            return
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, 0.02, generator=gen)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        return self

    def reset_rope_(self):
        """Recompute the rotary table (e.g. after the model was materialised from the meta device)."""
        device = self.transformer.ln_f.weight.device
        self.rope = rotary_table(self.config.n_positions, self.config.rotary_dim).to(device)
        return self

    def setup_caches(self, batch: int, max_len: int, static: bool = False) -> None:
        """Give every attention layer a preallocated KV cache for ``batch`` sequences of up to
        ``max_len`` positions (at most n_positions); ``forward(..., input_pos=...)`` then decodes
        with them. ``static``: every call attends over all max_len positions, masked (KVCache)."""
        if not 0 < max_len <= self.config.n_positions:
            raise ValueError(f"a KV cache of {max_len} positions: expected 1 to n_positions {self.config.n_positions}")
        device = self.transformer.ln_f.weight.device
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch, self.config.n_head, max_len, self.config.head_dim, device, static)

    def forward(self, input_ids, output_states=False, input_pos=None):
        """input_ids: (B, T) int64 -> logits (B, T, vocab) in the model's dtype; with
        ``output_states`` a ModelOutput that also holds the hidden states (the embeddings, then
        every block's output) and every layer's attention probabilities (B, H, T, T). With
        ``input_pos`` (T,), the tokens' positions, they attend to what the KV caches
        (``setup_caches``) hold before them, and their keys and values are added there."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions {self.config.n_positions}")
        x = self.transformer.wte(input_ids)
        cos, sin = (self.rope[:, :T] if input_pos is None else self.rope[:, input_pos]).to(x.dtype)
        hidden, probs = ([x], []) if output_states else (None, None)
        for block in self.transformer.h:
            x = block(x, cos, sin, probs, input_pos)
            if output_states:
                hidden.append(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return ModelOutput(logits, hidden, probs) if output_states else logits


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    hidden_states: list  # n_layer + 1 tensors (B, T, d_model): embeddings, then each block's output
    attentions: list  # n_layer tensors (B, H, T, T): attention probabilities


def lm_forward(model, input_ids, targets, output_states=False):
    """The plain language-model forward: (cross-entropy loss, model output)."""
    out = model(input_ids, output_states=output_states)
    logits = out.logits if output_states else out
    loss, _, _ = lm_and_soft_ce(logits, targets)
    return loss, out
