"""MoE routing during training: each FFN computes only what its top-k experts would give.

``route_experts(model, path, topk)`` replaces every ReLU FFN by a ``RoutedMLP`` that keeps the
FFN's own ``fc_in`` and ``fc_out`` (same parameter names, so the state dict stays a GPT-J one, and
int8 QAT flags and 2:4 pruning masks keep applying to them) and zeroes, per token, the activations
of the experts its router did not choose. The routers are frozen: they are not parameters of the
model, and the experts learn to live with their choices (the MoE fine-tuning of MoEfication).

``load_experts`` reads and checks a Routers artifact's clusters and routers; ``BMMoE.moefy``
builds its inference modules from the same.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from pipeline.moefication.experts import check_topk
from pipeline.moefication.files import CLUSTERS, ROUTERS
from pipeline.moefication.router import Router


def load_experts(model, path, num_expert: int | None = None) -> list[tuple[torch.Tensor, Router]]:
    """Per layer of ``model``: (expert label of each FFN neuron, router), from a directory holding
    ``clusters.safetensors`` and ``routers.safetensors``; checked against the model (and against
    ``num_expert`` when given)."""
    path = Path(path)
    for name in (CLUSTERS, ROUTERS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: the MoE needs the clusters and routers there "
                                    f"(a Routers artifact directory)")
    clusters, routers = load_file(str(path / CLUSTERS)), load_file(str(path / ROUTERS))
    layers = []
    for i, block in enumerate(model.transformer.h):
        key = f"layer_{i:03d}"
        if f"{key}.labels" not in clusters or f"{key}.a" not in routers:
            raise ValueError(f"{path}: no clusters or router for layer {i}; they come from another model")
        labels, a = clusters[f"{key}.labels"].long(), routers[f"{key}.a"]
        d_ff, d_model = block.mlp.fc_in.weight.shape
        experts = num_expert or a.shape[0]
        if len(labels) != d_ff or a.shape != (experts, d_model) or int(labels.max()) >= experts:
            raise ValueError(f"{path}: layer {i}'s clusters or router do not fit this model with "
                             f"{experts} experts (they come from another model or setting)")
        if int(labels.min()) < 0 or not bool((torch.bincount(labels, minlength=experts) == d_ff // experts).all()):
            raise ValueError(f"{path}: layer {i}'s experts are not {experts} groups of {d_ff // experts} neurons "
                             f"each (the MoE needs equal experts)")
        router = Router(d_model, experts)
        router.load_state_dict({"a.weight": a, "b.weight": routers[f"{key}.b"]})
        layers.append((labels, router.requires_grad_(False)))
    return layers


def top_experts(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-token expert scores (a router's, or the experts' true activation mass): the
    ``topk`` chosen experts (tokens, topk) and the keep mask (tokens, num_expert), 1 where chosen.
    The one routing rule of the simulation, of training with routing and of the deployed model."""
    chosen = scores.topk(topk, dim=-1).indices
    return chosen, torch.zeros_like(scores).scatter_(-1, chosen, 1.0)


class RoutedMLP(nn.Module):
    """The FFN ``fc_out(relu(fc_in(x)) * m)``, with ``m`` keeping the neurons of the ``topk`` experts
    the (frozen) router picks for each token."""

    def __init__(self, mlp, labels: torch.Tensor, router: Router, topk: int):
        super().__init__()
        if mlp.activation != "relu":
            raise ValueError("MoE routing needs a ReLU model (convert it with the ReluModel stage first)")
        num_expert = router.b.weight.shape[0]
        check_topk(topk, num_expert)
        self.fc_in, self.fc_out, self.activation = mlp.fc_in, mlp.fc_out, "relu"
        self.register_buffer("expert_of", labels.to(mlp.fc_in.weight.device), persistent=False)
        self.routers = [router.to(mlp.fc_in.weight.device)]  # a list: not a submodule, so neither trained nor saved
        self.topk, self.num_expert = topk, num_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc_in(x))
        router = self.routers[0]
        if router.a.weight.device != x.device:  # the model moved after routing
            router.to(x.device)
        # routed in fp32 whatever the autocast or FSDP compute dtype, as inference routes
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            _, keep = top_experts(router(x.detach().float()), self.topk)
        return self.fc_out(h * keep.to(h.dtype)[..., self.expert_of])


def route_experts(model, path, topk: int) -> int:
    """Replace every FFN of ``model`` by its routed version (nothing changes when the checkpoint
    does not fit); returns the number of experts per layer."""
    layers = load_experts(model, path)
    routed = [RoutedMLP(block.mlp, labels, router, topk) for block, (labels, router) in zip(model.transformer.h, layers)]
    for block, mlp in zip(model.transformer.h, routed):
        block.mlp = mlp
    return routed[0].num_expert
