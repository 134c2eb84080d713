"""ExpertClusters: per layer, the ReLU model's FFN neurons split into ``num_expert`` equal experts
by balanced k-means, on the rows of ``fc_in`` (parameter clustering) or on which sample tokens
make each neuron fire (co-activation); a random split is the paper's baseline."""
from __future__ import annotations

import luigi

from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.stage import Stage, pipeline_settings


class ExpertClusters(Stage):
    num_expert = luigi.IntParameter(default=32, description="experts per FFN layer (must divide d_ff)")
    method = luigi.ChoiceParameter(default="balanced_kmeans", choices=("balanced_kmeans", "coactivation", "random"))
    seed = luigi.IntParameter(default=0)
    iterations = luigi.IntParameter(default=30)
    sample_tokens = luigi.IntParameter(default=8192, description="coactivation: training tokens per neuron profile")

    def upstream(self):
        ups = {"ReluModel": ReluModel()}
        if self.method == "coactivation":
            ups["HiddenStates"] = HiddenStates()
        return ups

    def effective_params(self) -> dict:
        from pipeline.moefication.experts import check_experts

        check_experts(pipeline_settings().architecture().n_inner, self.num_expert)
        params = {"num_expert": self.num_expert, "method": self.method, "seed": self.seed,
                  "iterations": self.iterations}
        if self.method == "coactivation":
            params["sample_tokens"] = self.sample_tokens
        return params

    def build(self, build, inputs) -> None:
        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.clustering import CLUSTERS
        from pipeline.moefication.param_cluster import TEMPLATE, cluster_layers, fc_in_weights, save_clusters

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        weights = fc_in_weights(state, TEMPLATE, pipeline_settings().architecture().n_layer)
        features = self.coactivation(inputs["HiddenStates"], state, weights) if self.method == "coactivation" else None
        tensors, metrics = cluster_layers(weights, self.num_expert, self.method, self.seed, self.iterations, features,
                                          resume=build.resume_dir)
        save_clusters(tensors, metrics, build.path / CLUSTERS)
        build.metrics.update(metrics)

    def coactivation(self, hidden, state, weights):
        import h5py
        import numpy as np
        import torch

        from pipeline.moefication.clustering import coactivation_rows
        from pipeline.moefication.hidden import HIDDEN, layer_name
        from pipeline.moefication.mlp_select import check_hidden_states, fc_in_biases
        from pipeline.moefication.param_cluster import TEMPLATE

        biases = fc_in_biases(state, TEMPLATE, weights)
        with h5py.File(hidden.file(HIDDEN), "r") as f:
            check_hidden_states(f, hidden.file(HIDDEN), len(weights), weights[0].shape[1])
            train = np.flatnonzero(~f["heldout"][:])[: self.sample_tokens]  # held-out tokens stay unseen
            return [coactivation_rows(torch.from_numpy(f[layer_name(i)][train[0]:train[-1] + 1][train - train[0]]
                                                       .astype(np.float32)), w, b)
                    for i, (w, b) in enumerate(zip(weights, biases))]
