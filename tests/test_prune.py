"""BMPrune: masks computed, checkpointed and held through training (one process, DDP and FSDP2
with two ranks through the training entry point)."""
import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import commands
from kernels import m4n2_1d, m4n2_2d_greedy
from pipeline.models import GPTJ, from_pretrained, get_preset, save_pretrained
from pipeline.prune import BMPrune, target_weights


def smoke_model(seed=0):
    torch.manual_seed(seed)
    return GPTJ(get_preset("gpt-j-smoke"))


def test_masks_hold_through_adamw_steps(tmp_path):
    model = smoke_model()
    masks = BMPrune.compute_mask(model, m4n2_2d_greedy, checkpoint=tmp_path / "masks.safetensors")
    assert len(masks) == 2 * 6  # fc_in, fc_out, q, k, v, out per layer
    before = {n: w.detach().clone() for n, w in target_weights(model).items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    BMPrune.set_optim_for_pruning(opt)
    for _ in range(5):
        ids = torch.randint(0, 512, (2, 16))
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, w in target_weights(model).items():
        kept = masks[name]
        assert (w[~kept] == 0).all(), name
        assert not torch.equal(w[kept], before[name][kept]), f"{name}: the kept weights train"
        # greedy never keeps more than 2 of any 4 along a row or a column
        assert kept.reshape(-1, 4).sum(1).max() <= 2 and kept.T.reshape(-1, 4).sum(1).max() <= 2


def test_masks_round_trip_through_their_checkpoint(tmp_path):
    path = tmp_path / "masks.safetensors"
    first = BMPrune.compute_mask(smoke_model(0), "m4n2_1d", checkpoint=path)
    assert set(load_file(str(path))) == set(first)
    other = smoke_model(1)  # other weights: the checkpoint's masks win over a recomputation
    again = BMPrune.compute_mask(other, "m4n2_1d", checkpoint=path)
    for name in first:
        assert torch.equal(again[name], first[name])
        assert not torch.equal(first[name], m4n2_1d(target_weights(smoke_model(1))[name].detach()).bool())
    for name, w in target_weights(other).items():
        assert (w[~first[name]] == 0).all()


def test_bad_pruning_input(tmp_path):
    with pytest.raises(ValueError, match="unknown prune function 'm4n2_3d'; expected one of m4n2_1d, "
                                         "m4n2_2d_greedy, m4n2_2d_best"):
        BMPrune.compute_mask(smoke_model(), "m4n2_3d")
    path = tmp_path / "masks.safetensors"
    masks = BMPrune.compute_mask(smoke_model(), "m4n2_1d", checkpoint=path)
    masks["transformer.h.0.mlp.fc_in.weight"] = torch.ones(128, 64, dtype=torch.bool)
    save_file(masks, str(path))
    with pytest.raises(ValueError, match=r"holds a mask of shape \(128, 64\) for 'transformer.h.0.mlp.fc_in.weight', "
                                         r"whose weight is \(256, 64\): it was computed for another model"):
        BMPrune.compute_mask(smoke_model(), "m4n2_1d", checkpoint=path)


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.slow  # torchrun
def test_training_entry_point_holds_the_masks_on_two_ranks(tmp_path, sharding):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    np.save(corpus / "train.npy", np.random.default_rng(0).integers(0, 512, size=20000).astype(np.uint16))
    start = tmp_path / "start"
    save_pretrained(smoke_model(), start)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline.train",
           "--save-dir", str(out), "--model", "gpt-j-smoke", "--load", str(start), "--data", str(corpus),
           "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--start-lr", "1e-2", "--warmup", "1",
           "--sharding", sharding, "--use-pruning", "--prune-func", "m4n2_2d_greedy"]
    commands.run(cmd, roots=[out], timeout=300)
    masks = load_file(str(out / "pruning_masks.safetensors"))
    trained, initial = from_pretrained(out).state_dict(), from_pretrained(start).state_dict()
    assert len(masks) == 12
    for name, kept in masks.items():
        assert torch.equal(kept, m4n2_2d_greedy(initial[name]).bool()), name
        assert (trained[name][~kept] == 0).all(), name
        assert not torch.equal(trained[name][kept], initial[name][kept]), name
    assert json.loads((out / "train_log.json").read_text())["sharding"] == sharding
