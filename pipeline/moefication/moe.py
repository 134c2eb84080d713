"""BMMoE: run each FFN as a mixture of experts, computing only the top-k experts its router picks.

Neurons are permuted so that every expert is a contiguous slice of ``fc_in``'s rows and
``fc_out``'s columns (which changes nothing mathematically). Two execution paths give the same
outputs: the simulation computes the dense FFN and masks the unchosen experts (equal to the dense
model when ``topk == num_expert``); the sparse path gathers only the chosen experts' weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.moefication.experts import check_topk
from pipeline.moefication.routed import load_experts, top_experts
from pipeline.moefication.router import Router
from pipeline.moefication.sparse import sparse_ffn

SELECTIONS = ("router", "groundtruth")


class MoEFFN(nn.Module):
    def __init__(self, mlp, labels: torch.Tensor, router: Router, topk: int, sparse: bool = False,
                 selection: str = "router"):
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"selection {selection!r} is unknown; expected one of {', '.join(SELECTIONS)}")
        if sparse and selection == "groundtruth":
            raise ValueError("groundtruth selection needs every activation, so it runs only as the simulation")
        num_expert = router.b.weight.shape[0]
        check_topk(topk, num_expert)
        if mlp.activation != "relu":
            raise ValueError("MoEfication needs a ReLU model (convert it with the ReluModel stage first)")
        perm = torch.argsort(labels, stable=True)
        self.register_buffer("w1", mlp.fc_in.weight.detach()[perm].contiguous())
        self.register_buffer("b1", mlp.fc_in.bias.detach()[perm].contiguous())
        # expert-major (w2.T contiguous): the sparse path reads each expert's columns as one block
        self.register_buffer("w2", mlp.fc_out.weight.detach()[:, perm].T.contiguous().T)
        self.register_buffer("b2", mlp.fc_out.bias.detach().clone())
        self.router, self.topk, self.sparse, self.selection = router, topk, sparse, selection
        self.num_expert, self.size = num_expert, len(labels) // num_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.sparse:
            chosen, _ = top_experts(self.router(flat), self.topk)  # (tokens, k)
            out = sparse_ffn(flat, self.w1, self.b1, self.w2, self.b2, chosen, self.size)
        else:
            h = torch.relu(flat @ self.w1.T + self.b1)
            # groundtruth: the experts that hold the most positive activation
            scores = h.reshape(len(flat), self.num_expert, self.size).sum(-1) if self.selection == "groundtruth" \
                else self.router(flat)
            _, mask = top_experts(scores, self.topk)
            out = (h * mask.to(h.dtype).repeat_interleave(self.size, dim=1)) @ self.w2.T + self.b2
        return out.reshape(*x.shape[:-1], -1)


class BMMoE:
    @staticmethod
    def moefy(model, num_expert: int, topk: int, checkpoint_path, sparse: bool = False,
              selection: str = "router") -> None:
        """Replace every FFN of ``model`` by its MoE version, from a directory holding the clusters
        and routers (``clusters.safetensors``, ``routers.safetensors``: a Routers artifact).
        ``selection="groundtruth"`` picks the experts by their true activation (the most activation
        mass any top-k selection covers, layer by layer; not a bound on perplexity, which a router
        can beat; simulation only)."""
        layers = load_experts(model, checkpoint_path, num_expert)
        # built for every layer before any is replaced: a bad checkpoint changes nothing
        moe = [MoEFFN(block.mlp, labels, router, topk, sparse, selection)
               for block, (labels, router) in zip(model.transformer.h, layers)]
        for block, ffn in zip(model.transformer.h, moe):
            block.mlp = ffn


def load_moefied(path: str, num_expert: int, topk: int, routers: str, selection: str = "router",
                 sparse: bool = False):
    """The dense model in ``path`` as a mixture of experts with the routers in ``routers`` (an
    evaluation job's loader)."""
    from pipeline.models import from_pretrained

    model = from_pretrained(path)
    BMMoE.moefy(model, num_expert, topk, routers, sparse=sparse, selection=selection)
    return model.eval()
