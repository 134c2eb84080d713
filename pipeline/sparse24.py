"""2:4-sparse int8 weights stored compressed: of every group of 4 consecutive weights along a
row (the input dimension, the one 2:4 kernels reduce over), the 2 kept values and their 2-bit
positions in the group.

``pack(q)`` gives ``values`` (rows, cols / 2) int8 and ``index`` (rows, cols / 8) uint8 (four
2-bit positions per byte, two groups), or None when some group holds more than 2 nonzeros;
``unpack(values, index)`` restores ``q`` exactly. A group with fewer than 2 nonzeros keeps zeros
in its first free positions. 1 + 1/4 bytes per 2 weights: 0.625x the dense int8 bytes.
"""
from __future__ import annotations

import torch


def is_24(q: torch.Tensor) -> bool:
    """Whether every group of 4 along a row of the matrix ``q`` holds at most 2 nonzeros."""
    rows, cols = q.shape
    return cols % 4 == 0 and not bool(((q.reshape(rows, cols // 4, 4) != 0).sum(-1) > 2).any())


def pack(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, index) for an int8 matrix whose every group of 4 along a row has at most 2 nonzeros."""
    rows, cols = q.shape
    if cols % 8 or not is_24(q):
        return None
    groups = q.reshape(rows, cols // 4, 4)
    nonzero = groups != 0
    # the 2 kept positions of each group: its nonzeros first (in order), then its first zeros
    order = torch.argsort((~nonzero).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8), dim=-1, stable=True)
    kept = order[..., :2].sort(dim=-1).values  # (rows, groups, 2), ascending within each group
    values = groups.gather(-1, kept).reshape(rows, cols // 2)
    codes = kept.reshape(rows, cols // 8, 4).to(torch.uint8)  # two groups' positions per byte
    index = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
    return values.contiguous(), index.contiguous()


def unpack(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The int8 matrix ``pack`` packed."""
    rows, half = values.shape
    codes = torch.stack([(index >> s) & 3 for s in (0, 2, 4, 6)], dim=-1).reshape(rows, half // 2, 2).long()
    q = torch.zeros(rows, half // 2, 4, dtype=values.dtype, device=values.device)
    q.scatter_(-1, codes, values.reshape(rows, half // 2, 2))
    return q.reshape(rows, half * 2)
