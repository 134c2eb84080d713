"""Layer-by-layer work on several ranks: each rank clusters (or trains the routers of) its own
layers into the stage's per-layer progress, and the stage assembles exactly what one process
computes on its own."""
import h5py
import json
import numpy as np
import pytest
import torch

import commands
from pipeline import launch
from pipeline.models import GPTJ, get_preset, save_pretrained
from pipeline.moefication import mlp_select, param_cluster
from pipeline.moefication.hidden import layer_name

pytestmark = pytest.mark.slow  # torchrun

LAYERS = 3  # two ranks: layers 0 and 2 on rank 0, layer 1 on rank 1


def on_two_ranks(tmp_path, function, **kwargs):
    job = tmp_path / f"{function.__name__}.json"
    job.write_text(json.dumps({"function": f"{function.__module__}:{function.__name__}", "num_layer": LAYERS,
                               "kwargs": kwargs}))
    commands.run(launch.torchrun_command(["--job", str(job), "--out", str(tmp_path / "done.json")], 2,
                                         module="pipeline.layerwise"), timeout=300)
    assert json.loads((tmp_path / "done.json").read_text()) == {"layers": LAYERS, "world": 2}


def refuse_to_compute(*args, **kwargs):
    raise AssertionError("every layer was done by the ranks; the stage's process only assembles")


def test_two_ranks_cluster_and_train_routers_exactly_as_one_process(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = get_preset("gpt-j-smoke").replace(activation="relu", n_layer=LAYERS)
    model = tmp_path / "model"
    save_pretrained(GPTJ(config), model)
    hidden = tmp_path / "hidden.h5"
    rng = np.random.default_rng(0)
    with h5py.File(hidden, "w") as f:
        for i in range(LAYERS):
            f.create_dataset(layer_name(i), data=rng.standard_normal((320, config.n_embd)).astype(np.float16))
        f.create_dataset("heldout", data=np.arange(320) >= 256)

    args = {"num_expert": 8, "method": "coactivation", "seed": 0, "iterations": 5}
    fc_in, features = param_cluster.model_inputs(model, LAYERS, "coactivation", hidden, 200)
    alone, alone_metrics = param_cluster.cluster_layers(fc_in, features=features, **args)
    on_two_ranks(tmp_path, param_cluster.cluster_model_share, model=str(model), num_layer=LAYERS,
                 resume=str(tmp_path / "clusters-progress"), hidden=str(hidden), sample_tokens=200, **args)
    assert sorted(p.name for p in (tmp_path / "clusters-progress").iterdir()) == [
        f"layer_{i:03d}.safetensors" for i in range(LAYERS)]
    with monkeypatch.context() as m:
        m.setattr(param_cluster, "balanced_kmeans", refuse_to_compute)
        ranks, ranks_metrics = param_cluster.cluster_layers(fc_in, features=features,
                                                            resume=tmp_path / "clusters-progress", **args)
    assert alone.keys() == ranks.keys() and all(torch.equal(alone[k], ranks[k]) for k in alone)
    assert {k: v for k, v in ranks_metrics.items() if k != "seconds_per_layer"} == \
        {k: v for k, v in alone_metrics.items() if k != "seconds_per_layer"}

    param_cluster.save_clusters(alone, alone_metrics, tmp_path / "clusters.safetensors")
    routers = {"num_expert": 8, "topk": 2, "epochs": 2, "batch_size": 64, "lr": 0.01, "seed": 0}
    alone, alone_metrics = mlp_select.train_routers(hidden, fc_in, alone, **routers)
    on_two_ranks(tmp_path, mlp_select.train_model_share, model=str(model), num_layer=LAYERS, hidden=str(hidden),
                 clusters=str(tmp_path / "clusters.safetensors"), resume=str(tmp_path / "routers-progress"), **routers)
    with monkeypatch.context() as m:
        m.setattr(mlp_select, "train_router", refuse_to_compute)
        ranks, ranks_metrics = mlp_select.train_routers(hidden, fc_in, ranks, resume=tmp_path / "routers-progress",
                                                        **routers)
    assert alone.keys() == ranks.keys() and all(torch.equal(alone[k], ranks[k]) for k in alone)
    assert ranks_metrics == alone_metrics and alone_metrics["layers"] == LAYERS
