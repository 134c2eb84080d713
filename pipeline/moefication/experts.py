"""Expert sizes, without torch: the Luigi graph checks them when it computes versions."""
from __future__ import annotations


def check_experts(n_rows: int, num_expert: int) -> int:
    """The size of each of ``num_expert`` equal experts over ``n_rows`` neurons, or one sentence."""
    if num_expert <= 0 or n_rows % num_expert:
        raise ValueError(f"num_expert {num_expert} does not divide the {n_rows} neurons into equal experts "
                         f"(expected a divisor of {n_rows})")
    return n_rows // num_expert


def check_topk(topk: int, num_expert: int) -> None:
    if not 1 <= topk <= num_expert:
        raise ValueError(f"topk {topk} is out of range: expected 1 to num_expert ({num_expert})")
