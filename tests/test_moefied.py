"""The MoEfication chain on the smoke preset (the session's ``chain``: `make moefy NPROC=2` with
two torchrun ranks, then `make compress`): the HDF5 file holds exactly the FFN inputs, the
clusters are balanced, the routers beat a random router, Moefied reports its table, the
seed-style CLIs reproduce the stages' files, and PruningMasks searches 2:4 masks in the experts'
neuron order."""

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TWO_RANKS, artifact
from pipeline.data import load_tokens
from pipeline.evaluate import windows
from pipeline.models import from_pretrained
from pipeline.moefication import BMMoE

STAGES = ("Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters", "Routers", "Moefied")


def test_every_stage_is_published_once_and_up_to_date(chain):
    for stage in STAGES:  # two clusters and routers: the configured split and the random baseline
        assert len(chain.versions(stage)) == (2 if stage in ("ExpertClusters", "Routers") else 1), stage
    st = chain.status(*TWO_RANKS)
    assert {s: st[s]["state"] for s in STAGES} == {s: "up-to-date" for s in STAGES}


def test_hidden_states_hold_the_ffn_inputs(chain):
    art, manifest = artifact(chain, "HiddenStates")
    m = manifest["metrics"]
    assert manifest["params"]["world_size"] == 2
    assert m["layers"] == 2 and m["d_model"] == 64
    assert m["tokens"] == 63 * 64 and m["heldout_tokens"] == 6 * 64  # 4096 budget in windows of 64
    assert {f"shard-{r}-{k:04d}.h5" for r in range(2) for k in range(4)} | {"hidden_states.h5"} <= set(manifest["files"])
    assert not (art / "resume").exists()

    relu, _ = artifact(chain, "ReluModel")
    corpus, _ = artifact(chain, "Corpus")
    model = from_pretrained(relu)
    first_train = torch.from_numpy(windows(load_tokens(corpus / "train.npy"), 64, 4096 - 384)[:1, :-1])
    first_valid = torch.from_numpy(windows(load_tokens(corpus / "valid.npy"), 64, 384)[:1, :-1])
    seen = []
    hooks = [b.mlp.fc_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0]))
             for b in model.transformer.h]
    with torch.no_grad():
        model(first_train)
        model(first_valid)
    for h in hooks:
        h.remove()
    with h5py.File(art / "hidden_states.h5", "r") as f:
        heldout = f["heldout"][:]
        assert heldout.dtype == bool and heldout.sum() == 384 and heldout[-384:].all() and not heldout[:-384].any()
        for layer in range(2):
            data = f[f"layer_{layer:03d}"]
            assert data.dtype == np.float16 and data.shape == (63 * 64, 64)
            np.testing.assert_array_equal(data[:64], seen[layer].half().numpy())  # first train window
            np.testing.assert_array_equal(data[-384:-320], seen[2 + layer].half().numpy())  # first held-out one


def test_token_budget_larger_than_the_corpus_is_refused(chain):
    proc = chain.luigi("HiddenStates", *TWO_RANKS, "--HiddenStates-token-budget", "100000000", check=False)
    assert proc.returncode != 0
    assert "error: HiddenStates: token budget: 90000000 tokens asked of the train split, which holds" \
        in proc.stderr, proc.stderr[-2000:]
    assert not list(chain.artifacts.glob("HiddenStates/.scratch-*")), "nothing half-written"


def test_expert_clusters_are_balanced_and_beat_the_random_split(chain):
    path, manifest = artifact(chain, "ExpertClusters", lambda m: m["params"]["method"] == "balanced_kmeans")
    m = manifest["metrics"]
    assert m["layers"] == 2 and m["num_expert"] == 8 and m["expert_size"] == 32
    assert all(c > r for c, r in zip(m["cosine_to_centroid"], m["random_split_cosine"])), m
    clusters = load_file(str(path / "clusters.safetensors"))
    for layer in range(2):
        assert (np.bincount(clusters[f"layer_{layer:03d}.labels"].numpy(), minlength=8) == 32).all()
        assert clusters[f"layer_{layer:03d}.centroids"].shape == (8, 64)
    chain.luigi("ExpertClusters", *TWO_RANKS, "--ExpertClusters-method", "coactivation")
    path, manifest = artifact(chain, "ExpertClusters", lambda m: m["params"]["method"] == "coactivation")
    assert manifest["upstream"].keys() == {"ReluModel", "HiddenStates"} and manifest["params"]["sample_tokens"] == 8192
    labels = load_file(str(path / "clusters.safetensors"))["layer_000.labels"].numpy()
    assert (np.bincount(labels, minlength=8) == 32).all()
    assert manifest["metrics"]["mean_cosine_to_centroid"] > 0

    bad = chain.luigi("ExpertClusters", *TWO_RANKS, "--ExpertClusters-num-expert", "7", check=False)
    assert bad.returncode != 0
    assert "num_expert 7 does not divide the 256 neurons into equal experts" in bad.stdout + bad.stderr


def test_routers_beat_a_random_router(chain):
    _, manifest = artifact(chain, "Routers", lambda m: m["metrics"]["cluster_method"] == "balanced_kmeans")
    m = manifest["metrics"]
    assert m["num_expert"] == 8 and m["topk"] == 2
    for layer in m["per_layer"]:
        # a random choice of 2 of 8 experts covers 25% of the mass on average
        assert layer["router_coverage"] > 0.25 + 0.05, layer
        assert layer["router_coverage"] <= layer["groundtruth_coverage"] + 1e-6
    assert 0 < m["mean_coverage_ratio"] <= 1


def test_moefied_reports_perplexity_at_each_share_of_experts(chain):
    path, manifest = artifact(chain, "Moefied")
    m = manifest["metrics"]
    assert [(r["fraction"], r["topk"]) for r in m["table"]] == [(0.1, 1), (0.2, 2), (0.3, 2), (0.5, 4)]
    dense = m["dense_perplexity"]
    relu = artifact(chain, "ReluModel")[1]["metrics"]["valid_perplexity"]
    assert dense == pytest.approx(relu, rel=0.05)  # the same model on (almost) the same tokens
    for row in m["table"]:
        for name in ("mlp_router", "groundtruth", "random_split"):
            assert np.isfinite(row[name]) and row[f"{name}_ratio"] == pytest.approx(row[name] / dense, abs=1e-3)
    first, last = m["table"][0], m["table"][-1]
    assert last["mlp_router_ratio"] < first["mlp_router_ratio"], "more experts, closer to the dense model"
    assert m["sparse_max_abs_diff"] < 1e-4
    assert m["mean_coverage_ratio"] == artifact(chain, "Routers", lambda m: m["metrics"]["cluster_method"]
                                                == "balanced_kmeans")[1]["metrics"]["mean_coverage_ratio"]
    report = (path / "report.md").read_text()
    assert "| 20% | 2 |" in report and f"{dense:.2f}" in report
    assert (path / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_style_clis_reproduce_the_stages(chain, tmp_path):
    relu, _ = artifact(chain, "ReluModel")
    hidden, _ = artifact(chain, "HiddenStates")
    clusters, _ = artifact(chain, "ExpertClusters", lambda m: m["params"]["method"] == "balanced_kmeans")
    routers, _ = artifact(chain, "Routers", lambda m: m["metrics"]["cluster_method"] == "balanced_kmeans")
    res = tmp_path / "res"
    common = ["--model_path", str(relu), "--res_path", str(res), "--num-layer", "2", "--num-expert", "8",
              "--templates", "transformer.h.{}.mlp.fc_in.weight"]
    chain.run("-m", "pipeline.moefication.param_cluster", *common)
    chain.run("-m", "pipeline.moefication.mlp_select", *common, "--hidden_states", str(hidden / "hidden_states.h5"))
    for name, stage in (("clusters.safetensors", clusters), ("routers.safetensors", routers)):
        ours, theirs = load_file(str(res / name)), load_file(str(stage / name))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)
    model = from_pretrained(relu)
    BMMoE.moefy(model, 8, 2, res)  # what the CLIs write is what moefy loads
    assert type(model.transformer.h[0].mlp).__name__ == "MoEFFN"

    # bad input: one sentence, exit status 2, nothing written
    bad_hidden = tmp_path / "narrow.h5"
    with h5py.File(bad_hidden, "w") as f:
        for layer in range(2):
            f.create_dataset(f"layer_{layer:03d}", data=np.zeros((128, 32), np.float16))
        f.create_dataset("heldout", data=np.zeros(128, bool))
    (res / "routers.safetensors").unlink()
    proc = chain.run("-m", "pipeline.moefication.mlp_select", *common, "--hidden_states", str(bad_hidden), check=False)
    assert proc.returncode == 2
    assert f"hidden-state file {bad_hidden}: layer_000 is float16 of shape (128, 32), expected float16 or " \
           "float32 rows of width 64 (the model's d_model)" in proc.stderr
    assert not (res / "routers.safetensors").exists()

    other = load_file(str(res / "clusters.safetensors"))
    other["layer_001.labels"] = other["layer_001.labels"][:128]
    save_file(other, str(res / "clusters.safetensors"))
    proc = chain.run("-m", "pipeline.moefication.mlp_select", *common, "--hidden_states",
                     str(hidden / "hidden_states.h5"), check=False)
    assert proc.returncode == 2 and "they come from another model or expert count" in proc.stderr, proc.stderr
    proc = chain.run("-m", "pipeline.moefication.param_cluster", *common[:-4], "--num-expert", "7", check=False)
    assert proc.returncode == 2 and "num_expert 7 does not divide the 256 neurons" in proc.stderr, proc.stderr


def test_pruning_masks_stage_keeps_2_of_4_in_the_experts_order(chain):
    chain.luigi("PruningMasks", *TWO_RANKS, "--PruningMasks-prune-func", "m4n2_2d_greedy")
    chain.luigi("PruningMasks", *TWO_RANKS)  # the default: m4n2_2d_best
    chain.luigi("PruningMasks", *TWO_RANKS, "--PruningMasks-moefication", "false")
    greedy_dir, greedy = artifact(chain, "PruningMasks", lambda m: m["params"] == {"prune_func": "m4n2_2d_greedy",
                                                                                  "moefication": True})
    _, best = artifact(chain, "PruningMasks", lambda m: m["params"] == {"prune_func": "m4n2_2d_best", "moefication": True})
    _, base = artifact(chain, "PruningMasks", lambda m: not m["params"]["moefication"])
    assert greedy["upstream"].keys() == {"ReluModel", "ExpertClusters"} and base["upstream"].keys() == {"BaseModel"}
    assert greedy["metrics"]["matrices"] == 12 and best["metrics"]["kept"] == 0.5
    for name, g in greedy["metrics"]["per_matrix"].items():
        b = best["metrics"]["per_matrix"][name]
        assert b["kept"] == 0.5 and b["short_lines"] == 0 and b["mass_kept"] >= g["mass_kept"] - 1e-6, name
        assert g["kept"] <= 0.5 and 0.5 < g["mass_kept"] <= b["mass_kept"] + 1e-6
    # FFN masks are 2:4 in the order BMMoE runs the neurons, not necessarily in the model's
    labels = load_file(str(artifact(chain, "ExpertClusters", lambda m: m["params"]["method"] == "balanced_kmeans")[0]
                           / "clusters.safetensors"))["layer_000.labels"]
    perm = torch.argsort(labels, stable=True)
    masks = load_file(str(greedy_dir / "pruning_masks.safetensors"))
    for mask in (masks["transformer.h.0.mlp.fc_in.weight"][perm], masks["transformer.h.0.mlp.fc_out.weight"][:, perm]):
        assert mask.reshape(-1, 4).sum(1).max() <= 2 and mask.T.reshape(-1, 4).sum(1).max() <= 2
