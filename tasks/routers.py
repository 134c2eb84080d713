"""Routers (MLP select): per layer, a router trained on the hidden states to pick the experts that
hold the most positive activation; held-out coverage against groundtruth selection."""
from __future__ import annotations

import shutil

import luigi

from tasks.expert_clusters import ExpertClusters
from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.params import Count, Int, Number
from tasks.stage import Stage, layer_work_needs, pipeline_settings


class Routers(Stage):
    topk_fraction = Number(above=0, at_most=1, description="share of experts selected per token")
    epochs = Count(description="passes over the training hidden states")
    batch_size = Count(description="tokens per router training step")
    lr = Number(above=0)
    seed = Int()
    # Moefied asks for a second set on the random split: the paper's baseline
    cluster_method = luigi.Parameter(description="ExpertClusters method; empty: as configured")

    def upstream(self):
        clusters = ExpertClusters(method=self.cluster_method) if self.cluster_method else ExpertClusters()
        return {"ReluModel": ReluModel(), "HiddenStates": HiddenStates(), "ExpertClusters": clusters}

    def effective_params(self) -> dict:
        return {"topk_fraction": self.topk_fraction, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed}

    def needs(self):
        config, tokens = pipeline_settings().architecture(), self.upstream()["HiddenStates"].token_budget
        k, d, ff = self.upstream()["ExpertClusters"].num_expert, config.n_embd, config.n_inner
        router = (d * k + k * k) * 4
        clusters = config.n_layer * (ff * 8 + k * d * 4)
        # per layer: the routers as progress and published, and the clusters' copy beside them
        disk = 2 * config.n_layer * router + clusters
        # per layer at work, the larger of: reading fc_in (the file's pages, then the copy); fc_in
        # in fp32, the router with its gradient and Adam's moments, a batch's rows and activations.
        # Beside them, every layer's clusters and trained router
        rows = ff * d * 4
        per_layer = max(2 * rows, rows + 4 * router + self.batch_size * (d + 3 * ff) * 4)
        needs = layer_work_needs(config.n_layer, per_layer, clusters + config.n_layer * router, 0, disk,
                                 "per layer at work: its fc_in, its router with Adam's state, a batch")
        # per layer: the experts' true activation once (fc_in), the router's two products forward and back
        needs.flops = config.n_layer * tokens * (2 * d * ff + self.epochs * 6 * (d * k + k * k))
        return needs

    def build(self, build, inputs) -> None:
        from safetensors.torch import load_file

        from pipeline.moefication.files import CLUSTERS, HIDDEN, ROUTERS
        from pipeline.moefication.mlp_select import check_clusters, save_routers, train_model_share, train_routers
        from pipeline.moefication.param_cluster import TEMPLATE, FcIn
        from tasks.layer_work import layers_on_ranks
        from tasks.ranks import local_device

        config, model = pipeline_settings().architecture(), inputs["ReluModel"].path
        clusters_file, hidden = inputs["ExpertClusters"].file(CLUSTERS), inputs["HiddenStates"].file(HIDDEN)
        clusters = load_file(str(clusters_file))
        num_expert = inputs["ExpertClusters"].metrics["num_expert"]
        check_clusters(clusters, clusters_file, config.n_layer, config.n_inner, config.n_embd, num_expert)
        args = {"num_expert": num_expert, "topk": max(1, round(self.topk_fraction * num_expert)),
                "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed}
        layers_on_ranks(build, train_model_share, config.n_layer, "routers", model=str(model),
                        hidden=str(hidden), clusters=str(clusters_file), resume=str(build.resume_dir), **args)
        tensors, metrics = train_routers(hidden, FcIn.from_dir(model, TEMPLATE, config.n_layer), clusters,
                                         resume=build.resume_dir, device=local_device(), **args)
        # with the clusters beside the routers, this directory is what BMMoE.moefy loads
        shutil.copyfile(clusters_file, build.path / CLUSTERS)
        save_routers(tensors, metrics, build.path / ROUTERS)
        build.metrics.update(metrics, cluster_method=inputs["ExpertClusters"].manifest["params"]["method"])
