"""Perplexity on held-out tokens: deterministic, batched, with a progress bar."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    """Consecutive non-overlapping windows of ``seq_len + 1`` tokens (input plus shifted target),
    taken from the start of ``tokens``, covering at most ``max_tokens`` targets (0: all)."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise ValueError(f"held-out split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return np.asarray(tokens[: n * seq_len + 1])[idx].astype(np.int64)


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8, max_tokens: int = 0,
               device: str | torch.device = "cpu", desc: str = "eval") -> dict:
    """Mean next-token cross-entropy and its exponential over the evaluation windows."""
    was_training = model.training
    model.eval()
    data = torch.from_numpy(windows(tokens, seq_len, max_tokens))
    total, count = 0.0, 0
    for i in tqdm(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
        chunk = data[i:i + batch_size].to(device)
        logits = model(chunk[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count}
