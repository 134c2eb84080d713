"""MoEfication (Zhang et al., 2022): split each FFN's neurons into experts and route tokens to a
few of them: clustering, hidden states, routers and BMMoE.

The package imports without torch (the Luigi graph and ``make status`` need only its checks);
the functions below load torch on first use.
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # also how the code fingerprint (pipeline/artifacts.py) sees these modules
    from pipeline.moefication.clustering import balanced_kmeans, cosine_to_centroid, random_split
    from pipeline.moefication.moe import BMMoE

_LAZY = {"balanced_kmeans": "clustering", "cosine_to_centroid": "clustering", "random_split": "clustering",
         "BMMoE": "moe"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["balanced_kmeans", "random_split", "cosine_to_centroid", "BMMoE"]
