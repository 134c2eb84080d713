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


class CoactivationFeatures:
    """``features[i]``: layer i's (neurons, tokens) firing pattern over the first ``sample_tokens``
    training tokens of the dump at ``hidden`` (held-out tokens stay unseen), computed on
    ``device`` when asked for, one layer at a time."""

    def __init__(self, hidden: Path, fc_in, sample_tokens: int, device: str | torch.device = "cpu"):
        self.hidden, self.fc_in, self.device = Path(hidden), fc_in, device
        with h5py.File(hidden, "r") as f:
            check_hidden_states(f, hidden, len(fc_in), fc_in.shape[1])
            self.train = np.flatnonzero(~f["heldout"][:])[:sample_tokens]

    def __len__(self) -> int:
        return len(self.fc_in)

    def __getitem__(self, i: int) -> torch.Tensor:
        with h5py.File(self.hidden, "r") as f:
            rows = f[layer_name(i)][self.train[0]:self.train[-1] + 1][self.train - self.train[0]]
        w, b = self.fc_in.layer(i)
        on = self.device
        return coactivation_rows(torch.from_numpy(rows.astype(np.float32)).to(on), w.to(on), b.to(on))
