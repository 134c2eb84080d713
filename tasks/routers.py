"""Routers (MLP select): per layer, a router trained on the hidden states to pick the experts that
hold the most positive activation; held-out coverage against groundtruth selection."""
from __future__ import annotations

import shutil

import luigi

from tasks.expert_clusters import ExpertClusters
from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.params import Count, Number
from tasks.stage import Stage, pipeline_settings


class Routers(Stage):
    topk_fraction = Number(above=0, at_most=1, description="share of experts selected per token")
    epochs = Count(description="passes over the training hidden states")
    batch_size = Count(description="tokens per router training step")
    lr = Number(above=0)
    seed = luigi.IntParameter()
    # Moefied asks for a second set on the random split: the paper's baseline
    cluster_method = luigi.Parameter(description="ExpertClusters method; empty: as configured")

    def upstream(self):
        clusters = ExpertClusters(method=self.cluster_method) if self.cluster_method else ExpertClusters()
        return {"ReluModel": ReluModel(), "HiddenStates": HiddenStates(), "ExpertClusters": clusters}

    def effective_params(self) -> dict:
        return {"topk_fraction": self.topk_fraction, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed}

    def needs(self):
        from pipeline.resources import Needs

        config, tokens = pipeline_settings().architecture(), self.upstream()["HiddenStates"].token_budget
        experts = self.upstream()["ExpertClusters"].num_expert
        layer, rows = tokens * config.n_embd * 4, config.n_layer * config.n_inner * config.n_embd * 4
        # per layer, W_a, W_b and the bias (published and as progress) and the clusters' copy
        disk = 2 * config.n_layer * (config.n_embd * experts + experts * experts + experts) * 4 \
            + config.n_layer * (config.n_inner * 8 + experts * config.n_embd * 4)
        # per layer: the experts' true activation once (fc_in), the router's two products forward and back
        flops = config.n_layer * tokens * (2 * config.n_embd * config.n_inner
                                           + self.epochs * 6 * (config.n_embd * experts + experts * experts))
        return Needs(disk, 2 * rows + 2 * layer, "every layer's fc_in rows, and one layer's hidden states in fp32 twice",
                     flops)

    def build(self, build, inputs) -> None:
        from safetensors.torch import load_file

        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.files import CLUSTERS, HIDDEN, ROUTERS
        from pipeline.moefication.mlp_select import check_clusters, save_routers, train_routers
        from pipeline.moefication.param_cluster import TEMPLATE, fc_in_biases, fc_in_weights

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        weights = fc_in_weights(state, TEMPLATE, pipeline_settings().architecture().n_layer)
        clusters_file = inputs["ExpertClusters"].file(CLUSTERS)
        clusters = load_file(str(clusters_file))
        num_expert = inputs["ExpertClusters"].metrics["num_expert"]
        check_clusters(clusters, clusters_file, weights, num_expert)
        tensors, metrics = train_routers(inputs["HiddenStates"].file(HIDDEN), weights,
                                         fc_in_biases(state, TEMPLATE, weights), clusters, num_expert,
                                         max(1, round(self.topk_fraction * num_expert)), self.epochs,
                                         self.batch_size, self.lr, self.seed, resume=build.resume_dir)
        # with the clusters beside the routers, this directory is what BMMoE.moefy loads
        shutil.copyfile(clusters_file, build.path / CLUSTERS)
        save_routers(tensors, metrics, build.path / ROUTERS)
        build.metrics.update(metrics, cluster_method=inputs["ExpertClusters"].manifest["params"]["method"])
