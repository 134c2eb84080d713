"""Sparse MoE FFN: compute only the experts the router chose, reading only their weights.

Expert ``e`` is neurons ``e*size:(e+1)*size``: rows of ``w1`` (d_ff, d_model) and columns of
``w2`` (d_model, d_ff). The (token, expert) pairs are sorted by expert and each expert runs one
small matmul over just its tokens (``F.grouped_mm``, a C++ loop over the experts on CPU), so an
unchosen expert's weights are never read and no weight is copied.

Layout: ``w1``'s experts are contiguous, but in a row-major ``w2`` an expert's columns are
``d_model`` scattered 4*size-byte pieces, which reads several times slower than the same bytes
in one block. Pass ``w2`` as the transpose of a contiguous (d_ff, d_model) tensor
(``w2 = w2t.T``, same shape and values) to make every expert's ``w2`` contiguous too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_ffn(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               chosen: torch.Tensor, size: int) -> torch.Tensor:
    """``relu(x w1^T + b1) w2^T + b2`` over the ``chosen`` (tokens, k) experts' neurons only."""
    (tokens, k), (d_ff, d_model) = chosen.shape, w1.shape
    num_expert = d_ff // size
    flat = chosen.flatten()
    order = flat.argsort()
    token, expert = order // k, flat[order]
    offs = torch.bincount(flat, minlength=num_expert).cumsum(0, dtype=torch.int32)
    h = F.grouped_mm(x[token], w1.view(num_expert, size, d_model).transpose(1, 2), offs=offs)
    h = torch.relu_(h + b1.view(num_expert, size)[expert])
    y = F.grouped_mm(h, w2.T.view(num_expert, size, d_model), offs=offs)  # (pairs, d_model)
    return b2.expand(tokens, d_model).clone().index_add_(0, token, y)
