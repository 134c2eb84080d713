"""Layer-by-layer stages keep each finished layer in their resume directory: a rerun after a crash
redoes only the missing layers and ends with the same result."""
import h5py
import numpy as np
import torch

from pipeline.moefication import mlp_select, param_cluster
from pipeline.moefication.hidden import layer_name


def weights(layers=3, d_ff=64, d_model=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(d_ff, d_model, generator=g) for _ in range(layers)]


def test_clustering_resumes_from_finished_layers(tmp_path, monkeypatch):
    w = weights()
    whole, metrics = param_cluster.cluster_layers(w, 4, seed=1)
    resume = tmp_path / "resume"
    param_cluster.cluster_layers(w, 4, seed=1, resume=resume)
    (resume / "layer_001.safetensors").unlink()  # the layer a crash interrupted
    calls = []
    real = param_cluster.balanced_kmeans
    monkeypatch.setattr(param_cluster, "balanced_kmeans", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed, resumed_metrics = param_cluster.cluster_layers(w, 4, seed=1, resume=resume)
    assert len(calls) == 1, "only the missing layer is clustered again"
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert resumed_metrics["cosine_to_centroid"] == metrics["cosine_to_centroid"]


def test_router_training_resumes_from_finished_layers(tmp_path, monkeypatch):
    w = weights(layers=2)
    b = [torch.zeros(64) for _ in w]
    clusters, _ = param_cluster.cluster_layers(w, 4, seed=0)
    hidden = tmp_path / "hidden.h5"
    rng = np.random.default_rng(0)
    with h5py.File(hidden, "w") as f:
        for i in range(len(w)):
            f.create_dataset(layer_name(i), data=rng.standard_normal((256, 16)).astype(np.float16))
        f.create_dataset("heldout", data=np.arange(256) >= 224)
    fc_in = param_cluster.FcIn.from_state({**{param_cluster.TEMPLATE.format(i): t for i, t in enumerate(w)},
                                           **{f"transformer.h.{i}.mlp.fc_in.bias": t for i, t in enumerate(b)}})
    args = (hidden, fc_in, clusters, 4, 2, 2, 64, 0.01, 0)
    whole, metrics = mlp_select.train_routers(*args)
    resume = tmp_path / "resume"
    mlp_select.train_routers(*args, resume=resume)
    (resume / "layer_000.safetensors").unlink()
    calls = []
    real = mlp_select.train_router
    monkeypatch.setattr(mlp_select, "train_router", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed, resumed_metrics = mlp_select.train_routers(*args, resume=resume)
    assert len(calls) == 1, "only the missing layer's router is trained again"
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert resumed_metrics == metrics
