"""BMMoE.moefy: all experts equal the dense model; the sparse path equals the simulation."""
import copy

import numpy as np
import pytest
import torch

from pipeline.models import GPTJ, get_preset
from pipeline.moefication import BMMoE, balanced_kmeans
from pipeline.moefication.routed import route_experts


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_all_experts_equal_the_dense_model(relu_model_and_checkpoint):
    model, ckpt = relu_model_and_checkpoint
    ids = torch.randint(0, 512, (2, 20))
    dense = logits(model, ids)
    BMMoE.moefy(model, 8, 8, ckpt)
    torch.testing.assert_close(logits(model, ids), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 2, 5])
def test_sparse_path_equals_the_simulation(relu_model_and_checkpoint, topk):
    model, ckpt = relu_model_and_checkpoint
    sparse = copy.deepcopy(model)
    ids = torch.randint(0, 512, (2, 20))
    dense = logits(model, ids)
    BMMoE.moefy(model, 8, topk, ckpt)
    BMMoE.moefy(sparse, 8, topk, ckpt, sparse=True)
    simulated = logits(model, ids)
    torch.testing.assert_close(logits(sparse, ids), simulated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(simulated, dense, atol=1e-4), "fewer experts change the output"


def test_bad_moefy_input(relu_model_and_checkpoint, tmp_path):
    model, ckpt = relu_model_and_checkpoint
    dense = logits(model, torch.arange(8)[None])
    with pytest.raises(ValueError, match="topk 9 is out of range: expected 1 to num_expert \\(8\\)"):
        BMMoE.moefy(model, 8, 9, ckpt)
    assert torch.equal(logits(model, torch.arange(8)[None]), dense), "a refused moefy leaves the model as it was"
    with pytest.raises(ValueError, match="do not fit this model with 16 experts"):
        BMMoE.moefy(model, 16, 2, ckpt)
    with pytest.raises(FileNotFoundError, match="clusters.safetensors is missing"):
        BMMoE.moefy(model, 8, 2, tmp_path / "nowhere")
    gelu = GPTJ(get_preset("gpt-j-smoke"))
    with pytest.raises(ValueError, match="MoEfication needs a ReLU model"):
        BMMoE.moefy(gelu, 8, 2, ckpt)
    assert np.isfinite(logits(model, torch.randint(0, 512, (1, 4))).numpy()).all()


def test_groundtruth_selection_keeps_the_experts_with_the_most_activation(relu_model_and_checkpoint):
    model, ckpt = relu_model_and_checkpoint
    mlp = model.transformer.h[0].mlp
    x = torch.randn(5, 64)
    with torch.no_grad():
        act = torch.relu(mlp.fc_in(x))
        labels = torch.from_numpy(balanced_kmeans(mlp.fc_in.weight.numpy(), 8, seed=0))
        mass = torch.zeros(5, 8).index_add_(1, labels, act)
        keep = torch.zeros(5, 8).scatter_(1, mass.topk(3, dim=1).indices, 1.0)[:, labels]
        expected = mlp.fc_out(act * keep)
    all_experts, original = copy.deepcopy(model), copy.deepcopy(model)
    BMMoE.moefy(model, 8, 3, ckpt, selection="groundtruth")
    BMMoE.moefy(all_experts, 8, 8, ckpt, selection="groundtruth")
    with torch.no_grad():
        torch.testing.assert_close(model.transformer.h[0].mlp(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(all_experts.transformer.h[0].mlp(x), mlp(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="groundtruth selection needs every activation"):
        BMMoE.moefy(original, 8, 3, ckpt, sparse=True, selection="groundtruth")


def test_a_shard_with_no_windows_is_a_valid_empty_file(tmp_path):
    import h5py

    from pipeline.moefication.hidden import write_shard

    model = GPTJ(get_preset("gpt-j-smoke").replace(activation="relu")).eval()
    write_shard(model, tmp_path / "shard-1.h5", np.zeros((0, 16), np.int64), np.zeros(0, bool), 4, "empty")
    with h5py.File(tmp_path / "shard-1.h5", "r") as f:
        assert f["layer_000"].shape == (0, 64) and f["heldout"].shape == (0,) and f.attrs["complete"]


def test_routed_training_ffn_equals_the_moe_simulation(relu_model_and_checkpoint):
    """route_experts (training) computes what BMMoE.moefy's simulation does, keeps the GPT-J
    parameter names, trains fc_in/fc_out and not the routers."""
    model, ckpt = relu_model_and_checkpoint
    ids = torch.randint(0, 512, (2, 20))
    simulated = copy.deepcopy(model)
    BMMoE.moefy(simulated, 8, 3, ckpt)
    names = set(model.state_dict())
    assert route_experts(model, ckpt, 3) == 8
    assert set(model.state_dict()) == names, "the routed model's state dict is still a GPT-J one"
    torch.testing.assert_close(logits(model, ids), logits(simulated, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model, ids), logits(GPTJ(model.config).eval(), ids))
    model.train()
    model(ids).sum().backward()
    mlp = model.transformer.h[0].mlp
    assert mlp.fc_in.weight.grad is not None and mlp.fc_in.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in mlp.routers[0].parameters())
    assert all("router" not in n for n, _ in model.named_parameters())


def test_routed_refuses_bad_topk_and_leaves_the_model(relu_model_and_checkpoint):
    model, ckpt = relu_model_and_checkpoint
    ids = torch.randint(0, 512, (1, 8))
    before = logits(model, ids)
    with pytest.raises(ValueError, match="topk 9 is out of range: expected 1 to num_expert \\(8\\)"):
        route_experts(model, ckpt, 9)
    assert torch.equal(logits(model, ids), before)


def test_unequal_experts_are_refused(relu_model_and_checkpoint):
    from safetensors.torch import load_file, save_file

    model, ckpt = relu_model_and_checkpoint
    clusters = load_file(str(ckpt / "clusters.safetensors"))
    labels = clusters["layer_001.labels"].clone()
    labels[labels == 7] = 6  # expert 6 twice as large, expert 7 empty
    save_file({**clusters, "layer_001.labels": labels}, str(ckpt / "clusters.safetensors"))
    with pytest.raises(ValueError, match="layer 1's experts are not 8 groups of 32 neurons each"):
        route_experts(model, ckpt, 2)
    with pytest.raises(ValueError, match="layer 1's experts are not 8 groups"):
        BMMoE.moefy(model, 8, 2, ckpt)
