"""Weight-only int8 GEMVs over a MoE FFN's chosen experts, on fbgemm's embedding-bag kernel.

``torch.ops.quantized.embedding_bag_byte_rowwise_offsets`` sums weighted rows of a uint8 table
(each row ends with an fp32 scale and bias) in place: it reads only the rows it is given, with
kernels fbgemm generates for the machine's vector unit (AVX2 or AVX-512), and it runs one bag per
thread. Both products of one token through an expert-ordered ReLU FFN are such sums:

* ``fc_out``: ``y = sum_r h_r W2[:, r]`` over the chosen experts' neurons ``r``: rows of
  ``W2^T`` (``out_table``), split into one bag per thread;
* ``fc_in``: for expert ``e``, ``h_e = sum_k x_k W1[e-block, k]``: rows ``(e, k)`` of a table
  holding each expert's column ``k`` (``in_table``), one bag per chosen expert.

The tables hold ``q + 128`` with scale 1 and bias -128, so a row dequantizes to the int8 values
themselves; the per-neuron and per-output scales are applied to the sums, as in ``gathered_ffn``.
"""
from __future__ import annotations

import torch

_TAIL = torch.tensor([1.0, -128.0]).view(torch.uint8)  # each row's scale and bias: the int8 value back


def _table(q: torch.Tensor) -> torch.Tensor:
    """uint8 rows ``q + 128`` (q: int8 (rows, width)), each followed by ``_TAIL``."""
    shifted = (q.to(torch.int16) + 128).to(torch.uint8)
    return torch.cat([shifted, _TAIL.expand(len(q), -1)], 1).contiguous()


def in_table(q_w1: torch.Tensor, num_expert: int) -> torch.Tensor:
    """From ``fc_in``'s int8 weight in expert order (experts * size, d_model): the table whose row
    ``e * d_model + k`` holds expert ``e``'s ``size`` weights on input ``k``."""
    d_model = q_w1.shape[1]
    return _table(q_w1.view(num_expert, -1, d_model).transpose(1, 2).reshape(num_expert * d_model, -1))


def out_table(q_w2t: torch.Tensor) -> torch.Tensor:
    """From ``fc_out``'s int8 weight, transposed into expert order (experts * size, d_model)."""
    return _table(q_w2t)


def _bags(table, indices, offsets, weights):
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        table, indices, offsets=offsets, mode=0, per_sample_weights=weights, include_last_offset=False)


def gemv_in(table: torch.Tensor, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(topk, size): ``sum_k x_k q_w1[e-block, k]`` for each chosen expert ``e`` (x: (d_model,))."""
    d_model, topk = len(x), len(chosen)
    indices = (chosen[:, None] * d_model + torch.arange(d_model)).flatten()
    return _bags(table, indices, torch.arange(topk) * d_model, x.float().repeat(topk))


def gemv_out(table: torch.Tensor, h: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(d_model,): ``sum_r h_r q_w2t[r]`` over the chosen experts' rows (h: (topk, size))."""
    topk, size = h.shape
    rows = (chosen[:, None] * size + torch.arange(size)).flatten()
    parts = max(1, min(torch.get_num_threads(), topk))  # one bag per thread: fbgemm parallelises over bags
    offsets = torch.arange(parts) * (len(rows) // parts)
    return _bags(table, rows, offsets, h.float().flatten()).sum(0)
