"""Expert sizes, without torch: the Luigi graph checks them when it computes versions."""
from __future__ import annotations


def check_experts(n_rows: int, num_expert: int) -> int:
    """The size of each of ``num_expert`` equal experts over ``n_rows`` neurons, or one sentence."""
    if num_expert <= 0 or n_rows % num_expert:
        raise ValueError(f"num_expert {num_expert} does not divide the {n_rows} neurons into equal experts "
                         f"(expected a divisor of {n_rows})")
    return n_rows // num_expert
