"""ExpertClusters: per layer, the ReLU model's FFN neurons split into ``num_expert`` equal experts
by balanced k-means, on the rows of ``fc_in`` (parameter clustering) or on which sample tokens
make each neuron fire (co-activation); a random split is the paper's baseline."""
from __future__ import annotations


from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.params import Choice, Count, Int
from tasks.stage import Stage, layer_work_needs, pipeline_settings


class ExpertClusters(Stage):
    num_expert = Count(description="experts per FFN layer (must divide d_ff)")
    method = Choice(choices=("balanced_kmeans", "coactivation", "random"))
    seed = Int()
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
        config, k = pipeline_settings().architecture(), self.num_expert
        # per layer: the labels (int64) as progress and published, and the published fc_in centroids
        disk = config.n_layer * (2 * config.n_inner * 8 + k * config.n_embd * 4)
        ff, d, sample = config.n_inner, config.n_embd, self.sample_tokens
        rows = ff * d * 4  # one layer's fc_in rows in fp32
        # per layer at work, the largest of: reading the rows (the file's pages, then the copy);
        # the co-activation features being made (the rows, the sample's hidden states in fp16 and
        # fp32, their products, the firing pattern and its transpose); k-means on the points (the
        # points and their normalised copy, the scores and the swap gains twice)
        dim = sample if self.method == "coactivation" else d
        kmeans = 2 * ff * dim * 4 + 4 * ff * k * 4
        features = rows + sample * (6 * d + 9 * ff) if self.method == "coactivation" else 0
        needs = layer_work_needs(config.n_layer, max(2 * rows, features, kmeans), 0, 2 * rows, disk,
                                 "per layer at work: its fc_in rows, the features, k-means' points and scores")
        # k-means: every point against every centroid per iteration, for each seeding's screening
        # iterations and the best one's rest; co-activation: the sample tokens through each fc_in
        from pipeline.moefication.clustering import SCREEN, seedings

        screen = min(SCREEN, self.iterations)
        iterations = 0 if self.method == "random" else seedings(ff, dim, k) * screen + self.iterations - screen
        needs.flops = config.n_layer * 2.0 * ff * (iterations * k * dim + (d * sample if features else 0))
        return needs

    def build(self, build, inputs) -> None:
        from pipeline.moefication.files import CLUSTERS, HIDDEN
        from pipeline.moefication.param_cluster import cluster_layers, cluster_model_share, model_inputs, save_clusters
        from tasks.layer_work import layers_on_ranks
        from tasks.ranks import local_device

        model, n_layer = inputs["ReluModel"].path, pipeline_settings().architecture().n_layer
        hidden = inputs["HiddenStates"].file(HIDDEN) if self.method == "coactivation" else None
        args = {"num_expert": self.num_expert, "method": self.method, "seed": self.seed, "iterations": self.iterations}
        layers_on_ranks(build, cluster_model_share, n_layer, "clustering", model=str(model),
                        resume=str(build.resume_dir), hidden=hidden and str(hidden), sample_tokens=self.sample_tokens,
                        **args)
        device = local_device()  # with several ranks, every layer is done: what remains is assembling them
        fc_in, features = model_inputs(model, n_layer, self.method, hidden, self.sample_tokens, device)
        tensors, metrics = cluster_layers(fc_in, features=features, resume=build.resume_dir, device=device, **args)
        save_clusters(tensors, metrics, build.path / CLUSTERS)
        build.metrics.update(metrics)
