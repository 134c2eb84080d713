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

from pipeline import cli
from pipeline.artifacts import save_safetensors
from pipeline.cli import UsageError
from pipeline.moefication.files import CLUSTERS, HIDDEN, ROUTERS
from pipeline.moefication.hidden import check_hidden_states, layer_name
from pipeline.moefication.param_cluster import TEMPLATE, FcIn, layer_key
from pipeline.moefication.router import train_router
from pipeline.resume import LayerCheckpoints, Saved


def check_clusters(clusters: dict, path: Path, num_layer: int, d_ff: int, d_model: int, num_expert: int) -> None:
    """One sentence when the clusters do not belong to a model of this shape or to this expert count."""
    for i in range(num_layer):
        labels, centroids = clusters.get(f"{layer_key(i)}.labels"), clusters.get(f"{layer_key(i)}.centroids")
        if labels is None or centroids is None:
            raise ValueError(f"clusters {path} have no layer {i}; they come from another model")
        if labels.shape != (d_ff,) or centroids.shape != (num_expert, d_model):
            raise ValueError(f"clusters {path} for layer {i} have {labels.shape[0]} neurons and centroids "
                             f"{tuple(centroids.shape)}, expected {d_ff} neurons and ({num_expert}, "
                             f"{d_model}): they come from another model or expert count")


def train_share(hidden: Path, fc_in, clusters: dict, num_expert: int, topk: int, epochs: int, batch_size: int,
                lr: float, seed: int, resume: Path | None = None, layers=None,
                device: str | torch.device = "cpu") -> dict[int, Saved]:
    """{layer: ({"a", "b"}, metrics)}: the routers of ``layers`` (default: all), each kept in
    ``resume`` as it finishes and not trained again; ``fc_in`` may read its layers lazily."""
    if not 1 <= topk <= num_expert:
        raise ValueError(f"topk {topk} is out of range: expected 1 to num_expert ({num_expert})")
    with h5py.File(hidden, "r") as f:
        check_hidden_states(f, hidden, len(fc_in), clusters[f"{layer_key(0)}.centroids"].shape[1])
        heldout = f["heldout"][:]

    def train(i: int) -> Saved:
        key, (w, b) = layer_key(i), fc_in.layer(i)
        with h5py.File(hidden, "r") as f:
            router, metrics = train_router(f[layer_name(i)], heldout, w, b, clusters[f"{key}.labels"].long(),
                                           clusters[f"{key}.centroids"].float(), topk, epochs, batch_size, lr, seed,
                                           device)
        return ({"a": router.a.weight.detach().cpu(), "b": router.b.weight.detach().cpu()},
                {k: round(v, 4) for k, v in metrics.items()})

    layers = range(len(fc_in)) if layers is None else layers
    return LayerCheckpoints(resume).each(train, layers, "routers", parallel=torch.device(device).type == "cpu")


def train_model_share(model: str, num_layer: int, hidden: str, clusters: str, num_expert: int, topk: int,
                      epochs: int, batch_size: int, lr: float, seed: int, resume: str, layers=None,
                      device: str | torch.device = "cpu") -> None:
    """A rank's share of ``train_routers`` for a model directory (``pipeline.layerwise``)."""
    train_share(Path(hidden), FcIn.from_dir(model, TEMPLATE, num_layer), load_file(clusters), num_expert, topk,
                epochs, batch_size, lr, seed, Path(resume), layers, device)


def train_routers(hidden: Path, fc_in, clusters: dict, num_expert: int, topk: int, epochs: int, batch_size: int,
                  lr: float, seed: int, resume: Path | None = None,
                  device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for routers.safetensors, metrics): one trained router per layer (those that
    ``train_share`` did not find in ``resume`` are trained here)."""
    done = train_share(hidden, fc_in, clusters, num_expert, topk, epochs, batch_size, lr, seed, resume, device=device)
    tensors, per_layer = {}, []
    for i in range(len(fc_in)):
        saved = done[i]
        tensors[f"{layer_key(i)}.a"], tensors[f"{layer_key(i)}.b"] = saved[0]["a"].contiguous(), saved[0]["b"].contiguous()
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
        fc_in = FcIn.from_state(state, args.templates, args.num_layer)
        clusters = load_file(str(args.res_path / CLUSTERS))
        d_ff, d_model = fc_in[0].shape
        check_clusters(clusters, args.res_path / CLUSTERS, args.num_layer, d_ff, d_model, args.num_expert)
        topk = max(1, round(args.topk_fraction * args.num_expert))
        tensors, metrics = train_routers(hidden, fc_in, clusters, args.num_expert, topk, args.epochs,
                                         args.batch_size, args.lr, args.seed)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    save_routers(tensors, metrics, args.res_path / ROUTERS)
    print(f"{args.res_path / ROUTERS}: {metrics['layers']} routers; held-out coverage at top-{topk}: router "
          f"{metrics['mean_router_coverage']}, groundtruth {metrics['mean_groundtruth_coverage']} "
          f"(ratio {metrics['mean_coverage_ratio']})")
    return 0


if __name__ == "__main__":
    cli.run(main)
