"""Co-activation features for ExpertClusters: for each FFN neuron, which sample tokens of the
hidden-state dump make it fire. Balanced k-means on these rows puts neurons that fire together
into one expert (the paper's co-activation split)."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.moefication.clustering import coactivation_rows
from pipeline.moefication.hidden import check_hidden_states, layer_name
from pipeline.moefication.param_cluster import TEMPLATE, fc_in_biases


def coactivation_features(hidden: Path, state: dict, weights: list[torch.Tensor], sample_tokens: int) -> list:
    """Per layer, the (neurons, tokens) firing pattern over the first ``sample_tokens`` training
    tokens of the dump at ``hidden`` (held-out tokens stay unseen)."""
    biases = fc_in_biases(state, TEMPLATE, weights)
    with h5py.File(hidden, "r") as f:
        check_hidden_states(f, hidden, len(weights), weights[0].shape[1])
        train = np.flatnonzero(~f["heldout"][:])[:sample_tokens]
        return [coactivation_rows(torch.from_numpy(f[layer_name(i)][train[0]:train[-1] + 1][train - train[0]]
                                                   .astype(np.float32)), w, b)
                for i, (w, b) in enumerate(zip(weights, biases))]
