"""MLP select: train every layer's router on the dumped hidden states, writing ``routers.safetensors``
next to the clusters, which together are what ``BMMoE.moefy`` loads.

    python -m pipeline.moefication.mlp_select --model_path DIR --res_path DIR \\
        --num-layer 28 --num-expert 512 --templates 'transformer.h.{}.mlp.fc_in.weight'

The seed's ``mlp_select_example.py`` flags. ``--res_path`` holds ``clusters.safetensors`` (from
``param_cluster``) and, unless ``--hidden_states`` names another file, ``hidden_states.h5`` (from
``pipeline.moefication.hidden``). The Routers stage runs the same code.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from pipeline import cli
from pipeline.artifacts import save_safetensors
from pipeline.cli import UsageError
from pipeline.moefication.files import CLUSTERS, HIDDEN, ROUTERS
from pipeline.moefication.hidden import check_hidden_states, layer_name
from pipeline.moefication.param_cluster import TEMPLATE, fc_in_biases, fc_in_weights, layer_key
from pipeline.moefication.router import train_router
from pipeline.resume import LayerCheckpoints


def check_clusters(clusters: dict, path: Path, weights: list[torch.Tensor], num_expert: int) -> None:
    """One sentence when the clusters do not belong to this model or expert count."""
    for i, w in enumerate(weights):
        labels, centroids = clusters.get(f"{layer_key(i)}.labels"), clusters.get(f"{layer_key(i)}.centroids")
        if labels is None or centroids is None:
            raise ValueError(f"clusters {path} have no layer {i}; they come from another model")
        if labels.shape != (w.shape[0],) or centroids.shape != (num_expert, w.shape[1]):
            raise ValueError(f"clusters {path} for layer {i} have {labels.shape[0]} neurons and centroids "
                             f"{tuple(centroids.shape)}, expected {w.shape[0]} neurons and ({num_expert}, "
                             f"{w.shape[1]}): they come from another model or expert count")


def train_routers(hidden: Path, weights: list[torch.Tensor], biases: list[torch.Tensor], clusters: dict,
                  num_expert: int, topk: int, epochs: int, batch_size: int, lr: float,
                  seed: int, resume: Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for routers.safetensors, metrics): one trained router per layer. With ``resume``,
    each finished layer's router is kept there and not trained again."""
    if not 1 <= topk <= num_expert:
        raise ValueError(f"topk {topk} is out of range: expected 1 to num_expert ({num_expert})")
    tensors, per_layer = {}, []
    done = LayerCheckpoints(resume)
    with h5py.File(hidden, "r") as f:
        check_hidden_states(f, hidden, len(weights), weights[0].shape[1])
        heldout = f["heldout"][:]
        for i in tqdm(range(len(weights)), desc="routers", unit="layer"):
            key = layer_key(i)
            if (saved := done.load(i)) is None:
                router, metrics = train_router(f[layer_name(i)], heldout, weights[i], biases[i],
                                               clusters[f"{key}.labels"].long(), clusters[f"{key}.centroids"].float(),
                                               topk, epochs, batch_size, lr, seed)
                saved = ({"a": router.a.weight.detach(), "b": router.b.weight.detach()},
                         {k: round(v, 4) for k, v in metrics.items()})
                done.save(i, *saved)
            tensors[f"{key}.a"], tensors[f"{key}.b"] = saved[0]["a"].contiguous(), saved[0]["b"].contiguous()
            per_layer.append(saved[1])
    n = len(per_layer)
    return tensors, {
        "topk": topk, "num_expert": num_expert, "layers": n, "per_layer": per_layer,
        "mean_router_coverage": round(sum(m["router_coverage"] for m in per_layer) / n, 4),
        "mean_groundtruth_coverage": round(sum(m["groundtruth_coverage"] for m in per_layer) / n, 4),
        "mean_coverage_ratio": round(sum(m["coverage_ratio"] for m in per_layer) / n, 4),
    }


def save_routers(tensors: dict, metrics: dict, path: Path) -> None:
    save_safetensors(tensors, path, metadata={k: str(metrics[k]) for k in ("num_expert", "topk", "layers")})


def main(argv: list[str] | None = None) -> int:
    from pipeline.models.hf import read_weights

    p = argparse.ArgumentParser(prog="python -m pipeline.moefication.mlp_select", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", required=True, type=Path, help="the ReLU model (directory, .safetensors or .pt)")
    p.add_argument("--res_path", required=True, type=Path, help=f"directory holding {CLUSTERS}; receives {ROUTERS}")
    p.add_argument("--num-layer", required=True, type=int)
    p.add_argument("--num-expert", required=True, type=int)
    p.add_argument("--templates", default=TEMPLATE, help="fc_in weight name with {} for the layer number")
    p.add_argument("--hidden_states", type=Path, help=f"HDF5 hidden states (default: RES_PATH/{HIDDEN})")
    p.add_argument("--topk-fraction", type=float, default=0.2, help="share of experts the coverage metric selects")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    hidden = args.hidden_states or args.res_path / HIDDEN
    for path, what in ((args.res_path / CLUSTERS, "clusters (run param_cluster first)"), (hidden, "hidden states")):
        if not path.is_file():
            raise UsageError(f"{path} does not exist; expected the {what}")
    state, _ = read_weights(args.model_path, "--model_path")
    try:
        weights = fc_in_weights(state, args.templates, args.num_layer)
        clusters = load_file(str(args.res_path / CLUSTERS))
        check_clusters(clusters, args.res_path / CLUSTERS, weights, args.num_expert)
        topk = max(1, round(args.topk_fraction * args.num_expert))
        tensors, metrics = train_routers(hidden, weights, fc_in_biases(state, args.templates, weights), clusters,
                                         args.num_expert, topk, args.epochs, args.batch_size, args.lr, args.seed)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    save_routers(tensors, metrics, args.res_path / ROUTERS)
    print(f"{args.res_path / ROUTERS}: {metrics['layers']} routers; held-out coverage at top-{topk}: router "
          f"{metrics['mean_router_coverage']}, groundtruth {metrics['mean_groundtruth_coverage']} "
          f"(ratio {metrics['mean_coverage_ratio']})")
    return 0


if __name__ == "__main__":
    cli.run(main)
