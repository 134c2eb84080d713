"""Sparse MoE FFN: compute only the experts the router chose, reading only their weights.

Expert ``e`` is neurons ``e*size:(e+1)*size``: rows of ``w1`` (d_ff, d_model) and columns of
``w2`` (d_model, d_ff). The (token, expert) pairs are sorted by expert and every chosen expert
runs one small matmul over just its tokens, reading its weights in place (no gathered copy):
``F.grouped_mm`` (on CPU a C++ loop over the experts), or a Python loop for the shapes and
dtypes grouped_mm rejects.

Layout: in a row-major ``w2`` an expert's columns are ``d_model`` pieces of ``size`` floats, one
per row, which read about twice as slow as the same bytes in one block. For speed pass ``w2`` as
the transpose of a contiguous (d_ff, d_model) tensor (``w2t.T``: same shape and values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               chosen: torch.Tensor, size: int) -> torch.Tensor:
    """``relu(x w1^T + b1) w2^T + b2`` over the neurons of the ``chosen`` (tokens, k) experts only."""
    (tokens, k), (d_ff, d_model) = chosen.shape, w1.shape
    num_expert = d_ff // size
    flat = chosen.flatten()
    order = flat.argsort()
    token = order // k  # the pairs' tokens, grouped by expert
    counts = torch.bincount(flat, minlength=num_expert)
    out = b2.expand(tokens, d_model).clone()
    # F.grouped_mm rejects float64 and strides that are not multiples of 16 bytes
    if x.dtype == torch.float32 and d_model % 4 == 0 and size % 4 == 0:
        offs = counts.cumsum(0, dtype=torch.int32)
        h = F.grouped_mm(x.index_select(0, token), w1.view(num_expert, size, d_model).transpose(1, 2), offs=offs)
        h = torch.relu_(h + b1.view(num_expert, size)[flat[order]])
        return out.index_add_(0, token, F.grouped_mm(h, w2.T.view(num_expert, size, d_model), offs=offs))
    used = counts.nonzero().flatten()
    for e, tok in zip(used.tolist(), token.split(counts[used].tolist())):
        s = slice(e * size, (e + 1) * size)
        out.index_add_(0, tok, torch.relu(F.linear(x[tok], w1[s], b1[s])) @ w2[:, s].T)
    return out
