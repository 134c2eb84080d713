"""Routers (MLP select): per layer, a router trained on the hidden states to pick the experts that
hold the most positive activation; held-out coverage against groundtruth selection."""
from __future__ import annotations

import shutil

import luigi

from tasks.expert_clusters import ExpertClusters
from tasks.hidden_states import HiddenStates
from tasks.relu_model import ReluModel
from tasks.stage import Stage


class Routers(Stage):
    topk_fraction = luigi.FloatParameter(default=0.2, description="share of experts selected per token")
    epochs = luigi.IntParameter(default=10)
    batch_size = luigi.IntParameter(default=512, description="tokens per router training step")
    lr = luigi.FloatParameter(default=0.01)
    seed = luigi.IntParameter(default=0)

    def upstream(self):
        return {"ReluModel": ReluModel(), "HiddenStates": HiddenStates(), "ExpertClusters": ExpertClusters()}

    def effective_params(self) -> dict:
        if not 0 < self.topk_fraction <= 1:
            raise ValueError(f"Routers topk_fraction is {self.topk_fraction}, expected 0 < x <= 1")
        return {"topk_fraction": self.topk_fraction, "epochs": self.epochs, "batch_size": self.batch_size,
                "lr": self.lr, "seed": self.seed}

    def build(self, build, inputs) -> None:
        import h5py
        from safetensors.torch import load_file, save_file
        from tqdm import tqdm

        from pipeline.models import load_state_dict_from_dir
        from pipeline.moefication.hidden import HIDDEN, layer_name
        from pipeline.moefication.router import train_router

        state = load_state_dict_from_dir(inputs["ReluModel"].path)
        clusters = load_file(str(inputs["ExpertClusters"].file("clusters.safetensors")))
        num_expert = inputs["ExpertClusters"].metrics["num_expert"]
        topk = max(1, round(self.topk_fraction * num_expert))
        tensors, per_layer = {}, []
        with h5py.File(inputs["HiddenStates"].file(HIDDEN), "r") as f:
            heldout = f["heldout"][:]
            n_layers = int(f.attrs["layers"])
            if f.attrs["d_model"] != state["transformer.wte.weight"].shape[1]:
                raise ValueError(f"{inputs['HiddenStates'].path / HIDDEN} holds width {f.attrs['d_model']}, "
                                 f"not the ReLU model's")
            for i in tqdm(range(n_layers), desc="routers", unit="layer"):
                prefix = f"transformer.h.{i}.mlp.fc_in"
                router, metrics = train_router(
                    f[layer_name(i)], heldout, state[f"{prefix}.weight"].float(), state[f"{prefix}.bias"].float(),
                    clusters[f"layer_{i:03d}.labels"].long(), clusters[f"layer_{i:03d}.centroids"], topk,
                    self.epochs, self.batch_size, self.lr, self.seed)
                tensors[f"layer_{i:03d}.a"] = router.a.weight.detach().contiguous()
                tensors[f"layer_{i:03d}.b"] = router.b.weight.detach().contiguous()
                per_layer.append({k: round(v, 4) for k, v in metrics.items()})
        # with the clusters beside the routers, this directory is what BMMoE.moefy loads
        shutil.copyfile(inputs["ExpertClusters"].file("clusters.safetensors"), build.path / "clusters.safetensors")
        save_file(tensors, str(build.path / "routers.safetensors"),
                  metadata={"num_expert": str(num_expert), "topk": str(topk)})
        ratios = [m["coverage_ratio"] for m in per_layer]
        build.metrics.update({
            "topk": topk, "num_expert": num_expert, "per_layer": per_layer,
            "mean_router_coverage": round(sum(m["router_coverage"] for m in per_layer) / n_layers, 4),
            "mean_groundtruth_coverage": round(sum(m["groundtruth_coverage"] for m in per_layer) / n_layers, 4),
            "mean_coverage_ratio": round(sum(ratios) / n_layers, 4),
        })
