"""HiddenStates through Luigi with 2 torchrun ranks: the HDF5 file holds exactly the FFN inputs."""
import json

import h5py
import numpy as np
import torch

from pipeline.data import load_tokens
from pipeline.evaluate import windows
from pipeline.models import from_pretrained


def test_hidden_states_hold_the_ffn_inputs(project):
    args = ["--pipeline-nproc-per-node", "2"]
    project.luigi("HiddenStates", *args)
    [path] = project.artifacts.glob("HiddenStates/*/manifest.json")
    manifest = json.loads(path.read_text())
    art = path.parent
    relu = next(project.artifacts.glob("ReluModel/*/manifest.json")).parent
    corpus = next(project.artifacts.glob("Corpus/*/manifest.json")).parent
    m = manifest["metrics"]
    assert m["layers"] == 2 and m["d_model"] == 64
    assert m["tokens"] == 63 * 64 and m["heldout_tokens"] == 6 * 64  # 4096 budget in windows of 64
    assert {"shard-0.h5", "shard-1.h5", "hidden_states.h5"} <= set(manifest["files"])
    assert not (art / "resume").exists()

    model = from_pretrained(relu)
    first_train = torch.from_numpy(windows(load_tokens(corpus / "train.npy"), 64, 4096 - 384)[:1, :-1])
    first_valid = torch.from_numpy(windows(load_tokens(corpus / "valid.npy"), 64, 384)[:1, :-1])
    seen = []
    hooks = [b.mlp.fc_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][0])) for b in model.transformer.h]
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
    st = project.status(*args)
    assert st["HiddenStates"]["state"] == "up-to-date"
