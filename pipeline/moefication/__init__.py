"""MoEfication (Zhang et al., 2022): split each FFN's neurons into experts and route tokens to a
few of them: clustering, hidden states, routers and BMMoE."""
from pipeline.moefication.clustering import balanced_kmeans, cosine_to_centroid, random_split
from pipeline.moefication.moe import BMMoE

__all__ = ["balanced_kmeans", "random_split", "cosine_to_centroid", "BMMoE"]
