"""ExpertClusters: per layer, the ReLU model's FFN neurons (rows of ``fc_in``) split into
``num_expert`` equal experts by balanced k-means, with a random split measured beside it."""
from __future__ import annotations

import luigi

from tasks.relu_model import ReluModel
from tasks.stage import Stage, pipeline_settings


class ExpertClusters(Stage):
    num_expert = luigi.IntParameter(default=32, description="experts per FFN layer (must divide d_ff)")
    method = luigi.ChoiceParameter(default="balanced_kmeans", choices=("balanced_kmeans", "random"))
    seed = luigi.IntParameter(default=0)
    iterations = luigi.IntParameter(default=30)

    def upstream(self):
        return {"ReluModel": ReluModel()}

    def effective_params(self) -> dict:
        from pipeline.moefication.clustering import check_experts

        check_experts(pipeline_settings().architecture().n_inner, self.num_expert)
        return {"num_expert": self.num_expert, "method": self.method, "seed": self.seed,
                "iterations": self.iterations}

    def build(self, build, inputs) -> None:
        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.clustering import CLUSTERS
        from pipeline.moefication.param_cluster import TEMPLATE, cluster_layers, fc_in_weights, save_clusters

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        weights = fc_in_weights(state, TEMPLATE, pipeline_settings().architecture().n_layer)
        tensors, metrics = cluster_layers(weights, self.num_expert, self.method, self.seed, self.iterations)
        save_clusters(tensors, metrics, build.path / CLUSTERS)
        build.metrics.update(metrics)
