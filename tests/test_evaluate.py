"""Evaluation on several ranks: the windows split over them, the sums reduced, and the result the
same as one rank's, bit for bit, whatever the world size."""
import json

import numpy as np
import pytest
import torch

import commands
from pipeline import launch
from pipeline.evaluate import job, run_jobs
from pipeline.models import GPTJ, from_pretrained, get_preset, save_pretrained

pytestmark = pytest.mark.slow  # torchrun


def test_two_ranks_evaluate_exactly_what_one_rank_does(tmp_path):
    world = 2
    torch.manual_seed(0)
    save_pretrained(GPTJ(get_preset("gpt-j-smoke").replace(activation="relu")), tmp_path / "model")
    tokens = np.random.default_rng(0).integers(0, 512, size=2721).astype(np.uint16)  # 85 windows: 11 batches, 6 and 5 per rank
    np.save(tmp_path / "valid.npy", tokens)
    jobs = [job("relu", from_pretrained, ffn_sparsity=True, path=str(tmp_path / "model")),
            job("relu, 1000 tokens", from_pretrained, path=str(tmp_path / "model"))]
    one = {j["name"]: run_jobs([j], tokens, 32, max_tokens) for j, max_tokens in zip(jobs, (0, 1000))}

    results = {}
    for spec, max_tokens in zip(jobs, (0, 1000)):
        plan = tmp_path / "jobs.json"
        plan.write_text(json.dumps({"tokens": str(tmp_path / "valid.npy"), "seq_len": 32, "max_tokens": max_tokens,
                                    "jobs": [spec]}))
        cmd = launch.torchrun_command(["--job", str(plan), "--out", str(tmp_path / "out.json")], world,
                                      module="pipeline.evaluate")
        commands.run(cmd, timeout=300)
        results[spec["name"]] = json.loads((tmp_path / "out.json").read_text())
    assert results == one
    assert one["relu"]["relu"]["tokens"] == 85 * 32 and one["relu, 1000 tokens"]["relu, 1000 tokens"]["tokens"] == 31 * 32
    assert len(one["relu"]["relu"]["ffn_sparsity"]) == 2
