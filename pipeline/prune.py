"""BMPrune: 2:4 pruning-aware training, as in BMCook.

    BMPrune.compute_mask(model, prune_func, checkpoint=path)   # masks computed once, or loaded
    BMPrune.set_optim_for_pruning(optimizer)                     # pruned weights stay exactly zero

Masks cover the weights whose names match the target patterns (default: the FFN and attention
projections), are saved to / loaded from a safetensors checkpoint keyed by parameter name, and
are applied to the weights at once. The optimizer hooks mask the gradients before every step and
the weights after it, so Adam's moments cannot revive a pruned weight. Parameters are looked up
by name when the hooks are set, which makes the same code work after DDP wrapping (``module.``
prefix) and FSDP2 sharding (DTensor parameters get DTensor masks with the same placements).
"""
from __future__ import annotations

import fnmatch
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kernels.sparsity import get_mask_function, short_lines
from pipeline.artifacts import save_safetensors

PRUNING_MASKS = "pruning_masks.safetensors"
DEFAULT_TARGETS = ("*.mlp.fc_in.weight", "*.mlp.fc_out.weight", "*.attn.q_proj.weight", "*.attn.k_proj.weight",
                   "*.attn.v_proj.weight", "*.attn.out_proj.weight")


def _strip(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


def target_weights(model, targets=DEFAULT_TARGETS) -> dict[str, torch.nn.Parameter]:
    return {_strip(n): p for n, p in model.named_parameters()
            if any(fnmatch.fnmatchcase(_strip(n), t) for t in targets)}


def check_masks(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], path: Path) -> None:
    """One sentence when a mask checkpoint does not fit the model's target weights."""
    missing = sorted(set(weights) - set(masks))
    if missing:
        raise ValueError(f"mask checkpoint {path} has no mask for {missing[0]!r} ({len(missing)} target weights "
                         f"missing): it was computed for another model or other targets")
    for name, w in weights.items():
        if tuple(masks[name].shape) != tuple(w.shape):
            raise ValueError(f"mask checkpoint {path} holds a mask of shape {tuple(masks[name].shape)} for "
                             f"{name!r}, whose weight is {tuple(w.shape)}: it was computed for another model")


def search_masks(state: dict[str, torch.Tensor], prune_func: str, targets=DEFAULT_TARGETS,
                 neuron_order: dict[int, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(masks by name, metrics per matrix) for the target weights of a state dict. With
    ``neuron_order`` (per layer, the MoE's neuron permutation) the FFN masks are searched on the
    weights in the order the MoE runs them, so the 2:4 groups stay whole after the permutation,
    and stored in the model's order."""
    func = get_mask_function(prune_func)
    masks, per_matrix = {}, {}
    for name in sorted(n for n in state if any(fnmatch.fnmatchcase(n, t) for t in targets)):
        w = state[name].float()
        perm, dim = None, None
        if neuron_order is not None and ".mlp.fc_" in name:
            perm, dim = neuron_order[int(name.split(".")[2])], 0 if ".fc_in." in name else 1
            w = w.index_select(dim, perm)
        start = time.perf_counter()
        mask = func(w).to(torch.bool)
        seconds = time.perf_counter() - start
        metrics = {"kept": round(float(mask.float().mean()), 6),
                   "mass_kept": round(float(w.abs()[mask].sum() / w.abs().sum().clamp_min(1e-30)), 6),
                   "seconds": round(seconds, 4)}
        if prune_func != "m4n2_1d":
            metrics["short_lines"] = int(short_lines(mask))
        if perm is not None:
            mask = mask.index_select(dim, torch.argsort(perm))
        masks[name], per_matrix[name] = mask.contiguous(), metrics
    if not masks:
        raise ValueError(f"no weight matches the pruning targets {', '.join(targets)}")
    return masks, per_matrix


class BMPrune:
    _masks: dict[str, torch.Tensor] = {}
    _model = None

    @classmethod
    def compute_mask(cls, model, prune_func, checkpoint=None, targets=DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
        """Masks for ``model``'s target weights (``prune_func``: a mask function or its name),
        loaded from ``checkpoint`` when it exists, else computed and saved there; the weights are
        pruned at once. Returns the masks by parameter name."""
        weights = target_weights(model, targets)
        if not weights:
            raise ValueError(f"no weight of the model matches the pruning targets {', '.join(targets)}")
        path = Path(checkpoint) if checkpoint else None
        if path is not None and path.exists():
            masks = load_file(str(path))
            check_masks(masks, weights, path)
        else:
            func = get_mask_function(prune_func) if isinstance(prune_func, str) else prune_func
            masks = {name: func(w.detach()).to(torch.bool).cpu() for name, w in weights.items()}
            if path is not None:
                save_safetensors(masks, path)
        masks = {n: masks[n].to(torch.bool) for n in weights}
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(masks[name].to(w.device, w.dtype))
        cls._masks, cls._model = masks, model
        return masks

    @classmethod
    def set_optim_for_pruning(cls, optimizer, model=None) -> None:
        """Hook ``optimizer`` so that the pruned weights' gradients are zero before each step and the
        weights are zero after it. ``model``: the (possibly DDP- or FSDP2-wrapped) model whose
        parameters the optimizer holds; by default the one given to ``compute_mask``."""
        if not cls._masks:
            raise RuntimeError("BMPrune.compute_mask must run before set_optim_for_pruning")
        model = model if model is not None else cls._model
        params = dict(target_weights(model, tuple(cls._masks)))
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        pairs = [(p, _mask_like(cls._masks[name], p)) for name, p in params.items() if id(p) in in_optimizer]
        if len(pairs) != len(cls._masks):
            raise ValueError(f"the optimizer holds {len(pairs)} of the {len(cls._masks)} masked weights; build it "
                             f"from the same (wrapped) model's parameters")

        @torch.no_grad()
        def mask_grads(opt, args, kwargs):
            for p, m in pairs:
                if p.grad is not None:
                    p.grad.mul_(m)

        @torch.no_grad()
        def mask_weights(opt, args, kwargs):
            for p, m in pairs:
                p.mul_(m)

        optimizer.register_step_pre_hook(mask_grads)
        optimizer.register_step_post_hook(mask_weights)


def _mask_like(mask: torch.Tensor, param) -> torch.Tensor:
    """The mask in the parameter's dtype, device and (for FSDP2's DTensors) sharding; every rank
    holds the same full mask, so each takes its own shard without communication."""
    full = mask.to(param.device, param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full
