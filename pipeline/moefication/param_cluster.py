"""Parameter clustering of every FFN layer into experts, writing ``clusters.safetensors``.

    python -m pipeline.moefication.param_cluster --model_path DIR --res_path DIR \\
        --num-layer 28 --num-expert 512 --templates 'transformer.h.{}.mlp.fc_in.weight'

The seed's ``param_cluster_example.py`` flags: ``--model_path`` is a model directory, a
``.safetensors`` file or a weights-only PyTorch checkpoint; ``--templates`` names the ``fc_in``
weight of layer ``{}``. The ExpertClusters stage runs the same code.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import cli
from pipeline.artifacts import save_safetensors
from pipeline.cli import UsageError
from pipeline.resume import LayerCheckpoints
from pipeline.moefication.files import CLUSTERS
from pipeline.moefication.clustering import (balanced_kmeans, check_experts, cosine_to_centroid, expert_centroids,
                                             random_split)

TEMPLATE = "transformer.h.{}.mlp.fc_in.weight"
METHODS = ("balanced_kmeans", "random")  # the stage adds "coactivation" from the hidden states


def layer_key(i: int) -> str:
    return f"layer_{i:03d}"


class FcIn:
    """Every layer's ``fc_in`` in fp32, read one layer at a time: from a state dict, or from a
    model directory without loading the rest of the model. ``fc[i]`` is layer i's weight
    (d_ff, d_model); its bias is the tensor beside it (``...weight`` -> ``...bias``), else zeros."""

    def __init__(self, read, names, template: str, num_layer: int, origin: str = "the checkpoint"):
        if "{}" not in template:
            raise ValueError(f"--templates {template!r} has no '{{}}' where the layer number goes")
        if num_layer < 1:
            raise ValueError(f"--num-layer is {num_layer}; expected at least one layer")
        self._read, self.template, self.num_layer, self._shape = read, template, num_layer, None
        missing = [template.format(i) for i in range(num_layer) if template.format(i) not in names]
        if missing:
            raise ValueError(f"{origin} has no tensor {missing[0]!r} (--templates and --num-layer must name "
                             f"the fc_in weight of each of the {num_layer} layers)")
        self._has_bias = {i: self._bias_name(i) in names for i in range(num_layer)}

    @classmethod
    def from_state(cls, state: dict, template: str = TEMPLATE, num_layer: int | None = None) -> "FcIn":
        if num_layer is None:
            num_layer = sum(1 for i in range(len(state)) if template.format(i) in state)
        return cls(lambda names: {n: state[n] for n in names}, state, template, num_layer)

    @classmethod
    def from_dir(cls, path, template: str = TEMPLATE, num_layer: int = 0) -> "FcIn":
        from pipeline.models.hf import read_tensors

        return cls(lambda names: read_tensors(path, names), read_tensors(path), template, num_layer, str(path))

    def _bias_name(self, i: int) -> str:
        name = self.template.format(i)
        return name[: -len("weight")] + "bias" if name.endswith("weight") else ""

    def __len__(self) -> int:
        return self.num_layer

    @property
    def shape(self) -> tuple[int, int]:
        """(d_ff, d_model) of layer 0's weight."""
        if self._shape is None:
            self._shape = tuple(self[0].shape)
        return self._shape

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_layer:
            raise IndexError(i)
        return self._read([self.template.format(i)])[self.template.format(i)].float()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of layer i."""
        names = [self.template.format(i)] + ([self._bias_name(i)] if self._has_bias[i] else [])
        read = self._read(names)
        weight = read[names[0]].float()
        return weight, read[names[1]].float() if len(names) > 1 else torch.zeros(len(weight))


def check_method(method: str, features) -> None:
    if method not in METHODS + ("coactivation",):
        raise ValueError(f"clustering method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    if (method == "coactivation") != (features is not None):
        raise ValueError("coactivation clustering needs the neurons' activation profiles, and only it uses them")


def cluster_share(weights, num_expert: int, method: str = "balanced_kmeans", seed: int = 0, iterations: int = 30,
                  features=None, resume: Path | None = None, layers=None,
                  device: str | torch.device = "cpu") -> dict[int, tuple[np.ndarray, float]]:
    """{layer: (labels, seconds)} for ``layers`` (default: all), each kept in ``resume`` as it
    finishes and not clustered again. Balanced k-means runs on ``features[i]`` (one row per
    neuron) when given, else on the fc_in rows ``weights[i]``; both may be read lazily."""
    check_method(method, features)

    def cluster(i: int):
        start = time.perf_counter()
        if method == "random":
            labels = random_split(len(weights[i]), num_expert, seed=seed)
        else:
            points = weights[i] if features is None else features[i]
            labels = balanced_kmeans(points, num_expert, seed=seed, iterations=iterations, device=device)
        return {"labels": torch.from_numpy(labels)}, {"seconds": time.perf_counter() - start}

    layers = range(len(weights)) if layers is None else layers
    done = LayerCheckpoints(resume).each(cluster, layers, "clustering layers", parallel=torch.device(device).type == "cpu")
    return {i: (saved[0]["labels"].numpy(), saved[1]["seconds"]) for i, saved in done.items()}


def cluster_layers(weights, num_expert: int, method: str = "balanced_kmeans", seed: int = 0, iterations: int = 30,
                   features=None, resume: Path | None = None,
                   device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for clusters.safetensors, metrics): per layer, expert labels and centroids (of
    the fc_in rows, whatever was clustered); the layers ``cluster_share`` did not find in
    ``resume`` are clustered here."""
    results = cluster_share(weights, num_expert, method, seed, iterations, features, resume, device=device)
    tensors, cosine, baseline, seconds, shape = {}, [], [], [], None
    for i in range(len(weights)):
        rows, (labels, elapsed) = weights[i], results[i]
        check_experts(rows.shape[0], num_expert)
        shape = tuple(rows.shape)
        seconds.append(round(elapsed, 3))
        cosine.append(round(cosine_to_centroid(rows, labels), 4))
        baseline.append(round(cosine_to_centroid(rows, random_split(len(rows), num_expert, seed)), 4))
        tensors[f"{layer_key(i)}.labels"] = torch.from_numpy(labels)
        tensors[f"{layer_key(i)}.centroids"] = expert_centroids(rows, labels)
    metrics = {"layers": len(weights), "num_expert": num_expert, "expert_size": shape[0] // num_expert,
               "d_ff": shape[0], "d_model": shape[1], "method": method,
               "cosine_to_centroid": cosine, "mean_cosine_to_centroid": round(float(np.mean(cosine)), 4),
               "random_split_cosine": baseline, "seconds_per_layer": seconds}
    return tensors, metrics


def model_inputs(model: Path, num_layer: int, method: str, hidden: Path | None = None, sample_tokens: int = 0,
                 device: str | torch.device = "cpu"):
    """(fc_in, features) of the model directory ``model`` for ``method``, each read a layer at a time
    (the features only for co-activation, from the hidden states at ``hidden``)."""
    from pipeline import methods

    fc_in = FcIn.from_dir(model, TEMPLATE, num_layer)
    if method != "coactivation":
        return fc_in, None
    return fc_in, methods.use("coactivation").CoactivationFeatures(hidden, fc_in, sample_tokens, device)


def cluster_model_share(model: str, num_layer: int, num_expert: int, method: str, seed: int, iterations: int,
                        resume: str, hidden: str | None = None, sample_tokens: int = 0, layers=None,
                        device: str | torch.device = "cpu") -> None:
    """A rank's share of ``cluster_layers`` for a model directory (``pipeline.layerwise``)."""
    fc_in, features = model_inputs(Path(model), num_layer, method, hidden and Path(hidden), sample_tokens, device)
    cluster_share(fc_in, num_expert, method, seed, iterations, features, Path(resume), layers, device)


def save_clusters(tensors: dict, metrics: dict, path: Path) -> None:
    keys = ("layers", "num_expert", "d_ff", "d_model", "method")
    save_safetensors(tensors, path, metadata={k: str(metrics[k]) for k in keys})


def main(argv: list[str] | None = None) -> int:
    from pipeline.models.hf import read_weights

    p = argparse.ArgumentParser(prog="python -m pipeline.moefication.param_cluster",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, type=Path, help="the ReLU model (directory, .safetensors or .pt)")
    p.add_argument("--res_path", required=True, type=Path, help=f"directory that receives {CLUSTERS}")
    p.add_argument("--num-layer", required=True, type=int)
    p.add_argument("--num-expert", required=True, type=int)
    p.add_argument("--templates", default=TEMPLATE, help="fc_in weight name with {} for the layer number")
    p.add_argument("--method", default="balanced_kmeans", choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=30)
    args = p.parse_args(argv)
    state, _ = read_weights(args.model_path, "--model_path")
    try:
        weights = FcIn.from_state(state, args.templates, args.num_layer)
        for i in range(len(weights)):
            check_experts(len(weights[i]), args.num_expert)
    except ValueError as e:
        raise UsageError(str(e)) from None
    tensors, metrics = cluster_layers(weights, args.num_expert, args.method, args.seed, args.iterations)
    save_clusters(tensors, metrics, args.res_path / CLUSTERS)
    print(f"{args.res_path / CLUSTERS}: {metrics['layers']} layers x {args.num_expert} experts of "
          f"{metrics['expert_size']} neurons, mean cosine to centroid {metrics['mean_cosine_to_centroid']} "
          f"(random split {np.mean(metrics['random_split_cosine']):.4f})")
    return 0


if __name__ == "__main__":
    cli.run(main)
