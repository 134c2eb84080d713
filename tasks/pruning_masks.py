"""PruningMasks: 2:4 masks for the model the final stage fine-tunes (the ReLU model, with its FFN
masks searched in the experts' neuron order, or the base model when MoEfication is off)."""
from __future__ import annotations


from tasks.base_model import BaseModel
from tasks.expert_clusters import ExpertClusters
from tasks.relu_model import ReluModel
from tasks.params import Choice, Flag
from tasks.stage import Stage, pipeline_settings


class PruningMasks(Stage):
    prune_func = Choice(choices=("m4n2_1d", "m4n2_2d_greedy", "m4n2_2d_best"))
    moefication = Flag(description="true: masks for the ReLU model in expert order; false: the base model")

    @classmethod
    def instance(cls, params: dict) -> dict:
        return {"moefication": params["moefication"]}

    def upstream(self):
        if self.moefication:
            return {"ReluModel": ReluModel(), "ExpertClusters": ExpertClusters()}
        return {"BaseModel": BaseModel()}

    def needs(self):
        from pipeline.resources import Needs

        config = pipeline_settings().architecture()
        masks = config.n_layer * (4 * config.n_embd ** 2 + 2 * config.n_embd * config.n_inner)  # a byte per weight
        header = 16384 + config.n_layer * 6 * 256  # safetensors' header: a name, shape and offsets per matrix
        return Needs(masks + header, self.model_bytes() + 2 * masks, "the model's weights in fp32 and the masks")

    def effective_params(self) -> dict:
        return {"prune_func": self.prune_func, "moefication": self.moefication}

    def build(self, build, inputs) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.files import CLUSTERS
        from pipeline.prune import PRUNING_MASKS, search_masks

        source = inputs["ReluModel" if self.moefication else "BaseModel"]
        state = load_state_dict_from_dir(source.path)
        order = None
        if self.moefication:
            clusters = load_file(str(inputs["ExpertClusters"].file(CLUSTERS)))
            order = {int(k[len("layer_"):-len(".labels")]): torch.argsort(v, stable=True)  # as BMMoE permutes
                     for k, v in clusters.items() if k.endswith(".labels")}
        with build.timed("search"):
            masks, per_matrix = search_masks(state, self.prune_func, neuron_order=order)
        save_file(masks, str(build.path / PRUNING_MASKS), metadata={"prune_func": self.prune_func})
        total = sum(m.numel() for m in masks.values())
        build.metrics.update({
            "prune_func": self.prune_func, "matrices": len(masks), "weights": total,
            "kept": round(sum(int(m.sum()) for m in masks.values()) / total, 6),
            "mean_mass_kept": round(sum(p["mass_kept"] for p in per_matrix.values()) / len(per_matrix), 6),
            "short_lines": sum(p.get("short_lines", 0) for p in per_matrix.values()),
            "per_matrix": per_matrix,
        })
