"""ExpertClusters: per layer, the ReLU model's FFN neurons split into ``num_expert`` equal experts
by balanced k-means, on the rows of ``fc_in`` (parameter clustering) or on which sample tokens
make each neuron fire (co-activation); a random split is the paper's baseline."""
from __future__ import annotations

import luigi

from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.params import Choice, Count
from tasks.stage import Stage, pipeline_settings


class ExpertClusters(Stage):
    num_expert = Count(description="experts per FFN layer (must divide d_ff)")
    method = Choice(choices=("balanced_kmeans", "coactivation", "random"))
    seed = luigi.IntParameter()
    iterations = Count(description="k-means iterations")
    sample_tokens = Count(description="coactivation: training tokens per neuron profile")

    @classmethod
    def instance(cls, params: dict) -> dict:
        return {"method": params["method"]}

    def upstream(self):
        ups = {"ReluModel": ReluModel()}
        if self.method == "coactivation":
            ups["HiddenStates"] = HiddenStates()
        return ups

    def methods(self) -> tuple[str, ...]:
        return ("coactivation",) if self.method == "coactivation" else ()

    def effective_params(self) -> dict:
        from pipeline.moefication.experts import check_experts

        check_experts(pipeline_settings().architecture().n_inner, self.num_expert)
        params = {"num_expert": self.num_expert, "method": self.method, "seed": self.seed}
        if self.method != "random":  # k-means' iterations; a random split has none
            params["iterations"] = self.iterations
        if self.method == "coactivation":
            params["sample_tokens"] = self.sample_tokens
        return params

    def needs(self):
        from pipeline.resources import Needs

        config = pipeline_settings().architecture()
        # per layer: the labels (int64) and the fc_in centroids, once published and once as progress
        disk = 2 * config.n_layer * (config.n_inner * 8 + self.num_expert * config.n_embd * 4)
        rows = config.n_layer * config.n_inner * config.n_embd * 4  # every layer's fc_in rows in fp32
        features = config.n_layer * config.n_inner * self.sample_tokens * 4 if self.method == "coactivation" else 0
        needs = Needs(disk, 2 * rows + features, "every layer's fc_in rows in fp32 twice, and the features")
        # k-means: every neuron's row against every centroid per iteration; co-activation: the
        # sample tokens through each fc_in
        iterations = 0 if self.method == "random" else self.iterations
        needs.flops = config.n_layer * 2.0 * config.n_inner * config.n_embd * (
            iterations * self.num_expert + (self.sample_tokens if self.method == "coactivation" else 0))
        return needs

    def build(self, build, inputs) -> None:
        from pipeline import methods
        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.files import CLUSTERS, HIDDEN
        from pipeline.moefication.param_cluster import TEMPLATE, cluster_layers, fc_in_weights, save_clusters

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        weights = fc_in_weights(state, TEMPLATE, pipeline_settings().architecture().n_layer)
        features = None
        if self.method == "coactivation":
            hidden = inputs["HiddenStates"]
            features = methods.use("coactivation").coactivation_features(hidden.file(HIDDEN), state, weights,
                                                                         self.sample_tokens)
        tensors, metrics = cluster_layers(weights, self.num_expert, self.method, self.seed, self.iterations, features,
                                          resume=build.resume_dir)
        save_clusters(tensors, metrics, build.path / CLUSTERS)
        build.metrics.update(metrics)
