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
from tqdm import tqdm

from kernels.threads import parallel_map
from pipeline import cli
from pipeline.artifacts import save_safetensors
from pipeline.cli import UsageError
from pipeline.resume import LayerCheckpoints
from pipeline.moefication.files import CLUSTERS
from pipeline.moefication.clustering import (balanced_kmeans, check_experts, cosine_to_centroid, expert_centroids,
                                             random_split)

TEMPLATE = "transformer.h.{}.mlp.fc_in.weight"
METHODS = ("balanced_kmeans", "random")  # the stage adds "coactivation" from the hidden states


def fc_in_biases(state: dict, template: str, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fc_in bias beside each weight (``...weight`` -> ``...bias``; zeros when there is none)."""
    names = [template.format(i)[: -len("weight")] + "bias" if template.endswith("weight") else "" for i in
             range(len(weights))]
    return [state[n].float() if n in state else torch.zeros(len(w)) for n, w in zip(names, weights)]


def layer_key(i: int) -> str:
    return f"layer_{i:03d}"


def fc_in_weights(state: dict, template: str, num_layer: int) -> list[torch.Tensor]:
    """Every layer's fc_in weight (d_ff, d_model), or one sentence naming what is missing."""
    if "{}" not in template:
        raise ValueError(f"--templates {template!r} has no '{{}}' where the layer number goes")
    missing = [template.format(i) for i in range(num_layer) if template.format(i) not in state]
    if missing:
        raise ValueError(f"the checkpoint has no tensor {missing[0]!r} (--templates and --num-layer must name "
                         f"the fc_in weight of each of the {num_layer} layers)")
    return [state[template.format(i)].float() for i in range(num_layer)]


def cluster_layers(weights: list[torch.Tensor], num_expert: int, method: str = "balanced_kmeans", seed: int = 0,
                   iterations: int = 30, features: list[np.ndarray] | None = None,
                   resume: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for clusters.safetensors, metrics): per layer, expert labels and centroids (of
    the fc_in rows, whatever was clustered). Balanced k-means runs on ``features`` (one row per
    neuron) when given, else on the fc_in rows themselves. With ``resume``, each finished layer
    is kept there and not clustered again."""
    if method not in METHODS + ("coactivation",):
        raise ValueError(f"clustering method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    if (method == "coactivation") != (features is not None):
        raise ValueError("coactivation clustering needs the neurons' activation profiles, and only it uses them")
    for w in weights:
        check_experts(w.shape[0], num_expert)
    bar = tqdm(total=len(weights), desc="clustering layers", unit="layer")

    done = LayerCheckpoints(resume)

    def cluster(i: int) -> tuple[np.ndarray, float]:
        if (saved := done.load(i)) is not None:
            bar.update(1)
            return saved[0]["labels"].numpy(), saved[1]["seconds"]
        start = time.perf_counter()
        if method == "random":
            labels = random_split(weights[i].shape[0], num_expert, seed=seed)
        else:
            points = weights[i].numpy() if features is None else features[i]
            labels = balanced_kmeans(points, num_expert, seed=seed, iterations=iterations)
        elapsed = time.perf_counter() - start
        done.save(i, {"labels": torch.from_numpy(labels)}, {"seconds": elapsed})
        bar.update(1)
        return labels, elapsed

    # layers in parallel, one torch thread each; the labels do not depend on the thread count
    results = parallel_map(cluster, range(len(weights)))
    bar.close()
    tensors, cosine, baseline, seconds = {}, [], [], []
    for i, (w, (labels, elapsed)) in enumerate(zip(weights, results)):
        rows = w.numpy()
        seconds.append(round(elapsed, 3))
        cosine.append(round(cosine_to_centroid(rows, labels), 4))
        baseline.append(round(cosine_to_centroid(rows, random_split(len(rows), num_expert, seed)), 4))
        tensors[f"{layer_key(i)}.labels"] = torch.from_numpy(labels)
        tensors[f"{layer_key(i)}.centroids"] = expert_centroids(rows, labels)
    metrics = {"layers": len(weights), "num_expert": num_expert, "expert_size": weights[0].shape[0] // num_expert,
               "d_ff": weights[0].shape[0], "d_model": weights[0].shape[1], "method": method,
               "cosine_to_centroid": cosine, "mean_cosine_to_centroid": round(float(np.mean(cosine)), 4),
               "random_split_cosine": baseline, "seconds_per_layer": seconds}
    return tensors, metrics


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
        weights = fc_in_weights(state, args.templates, args.num_layer)
        for w in weights:
            check_experts(w.shape[0], args.num_expert)
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
