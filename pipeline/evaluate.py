"""Perplexity on held-out tokens: deterministic, batched, with a progress bar."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens (input plus shifted target). All of them,
    or with ``max_tokens`` that many targets' worth spread evenly over the whole split (so one
    large file at its start cannot dominate)."""
    total = (len(tokens) - 1) // seq_len
    if total < 1:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    n = min(total, max(1, max_tokens // seq_len)) if max_tokens else total
    starts = (np.arange(n) * total // n) * seq_len
    return np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_tokens: int = 0,
               device: str | torch.device = "cpu", desc: str = "eval", ffn_sparsity: bool = False) -> dict:
    """Mean next-token cross-entropy and its exponential over the evaluation windows; with
    ``ffn_sparsity`` also, per layer, the share of FFN activations that are exactly zero (the
    share of ``fc_in`` outputs at or below zero, which ReLU zeroes)."""
    was_training = model.training
    model.eval()
    data = torch.from_numpy(windows(tokens, seq_len, max_tokens))
    zeros, hooks = [], []
    if ffn_sparsity:
        for i, block in enumerate(model.transformer.h):
            zeros.append([0, 0])

            def count(module, inputs, output, tally=zeros[i]):
                tally[0] += int((output <= 0).sum())
                tally[1] += output.numel()
            hooks.append(block.mlp.fc_in.register_forward_hook(count))
    total, count = 0.0, 0
    try:
        for i in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
            chunk = data[i:i + batch_size].to(device)
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += chunk[:, 1:].numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    mean = total / count
    result = {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
    if ffn_sparsity:
        result["ffn_sparsity"] = [z / n for z, n in zeros]
    return result
