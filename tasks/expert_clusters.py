"""ExpertClusters: per layer, the ReLU model's FFN neurons (rows of ``fc_in``) split into
``num_expert`` equal experts by balanced k-means, with a random split measured beside it."""
from __future__ import annotations

import luigi

from tasks.relu_model import ReluModel
from tasks.stage import Stage, pipeline_settings

METHODS = ("balanced_kmeans", "random")


class ExpertClusters(Stage):
    num_expert = luigi.IntParameter(default=32, description="experts per FFN layer (must divide d_ff)")
    method = luigi.ChoiceParameter(default="balanced_kmeans", choices=METHODS)
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
        import time

        import torch
        from safetensors.torch import save_file
        from tqdm import tqdm

        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication import balanced_kmeans, cosine_to_centroid, random_split
        from pipeline.moefication.clustering import expert_centroids

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        layers = sorted({int(k.split(".")[2]) for k in state if k.endswith("mlp.fc_in.weight")})
        tensors, cosine, baseline, seconds = {}, [], [], []
        for i in tqdm(layers, desc="clustering layers", unit="layer"):
            rows = state[f"transformer.h.{i}.mlp.fc_in.weight"].float().numpy()
            start = time.perf_counter()
            if self.method == "balanced_kmeans":
                labels = balanced_kmeans(rows, self.num_expert, seed=self.seed, iterations=self.iterations)
            else:
                labels = random_split(len(rows), self.num_expert, seed=self.seed)
            seconds.append(round(time.perf_counter() - start, 3))
            cosine.append(round(cosine_to_centroid(rows, labels), 4))
            baseline.append(round(cosine_to_centroid(rows, random_split(len(rows), self.num_expert, self.seed)), 4))
            tensors[f"layer_{i:03d}.labels"] = torch.from_numpy(labels)
            tensors[f"layer_{i:03d}.centroids"] = expert_centroids(rows, labels)
        save_file(tensors, str(build.path / "clusters.safetensors"),
                  metadata={"num_expert": str(self.num_expert), "layers": str(len(layers))})
        build.metrics.update({
            "layers": len(layers), "num_expert": self.num_expert, "expert_size": len(rows) // self.num_expert,
            "cosine_to_centroid": cosine, "mean_cosine_to_centroid": round(sum(cosine) / len(cosine), 4),
            "random_split_cosine": baseline, "seconds_per_layer": seconds,
        })
