"""The training entry point: it learns, and a resumed run equals an uninterrupted one."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline import launch, train


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(0)
    # A learnable stream: a repeated random phrase with noise.
    phrase = rng.integers(0, 512, size=97)
    tokens = np.tile(phrase, 200).astype(np.uint16)
    noise = rng.random(len(tokens)) < 0.05
    tokens[noise] = rng.integers(0, 512, size=noise.sum())
    np.save(d / "train.npy", tokens)
    return d


def run(save_dir, corpus, *extra):
    return train.main(["--save-dir", str(save_dir), "--model", "gpt-j-smoke", "--data", str(corpus),
                       "--steps", "12", "--batch-size", "4", "--seq-len", "32", "--start-lr", "3e-3",
                       "--warmup", "2", "--save-interval", "4", "--log-interval", "4", *extra])


def test_resumed_run_equals_uninterrupted(tmp_path, corpus):
    assert run(tmp_path / "a", corpus) == 0
    assert run(tmp_path / "b", corpus, "--stop-after", "6") == 0
    assert not (tmp_path / "b" / "model.safetensors").exists(), "a stopped run publishes no model"
    pointer = json.loads((tmp_path / "b" / "resume" / train.CHECKPOINT).read_text())
    assert pointer["step"] == 4 and [p.name for p in (tmp_path / "b" / "resume").glob("step-*")] == [pointer["dir"]]
    assert run(tmp_path / "b", corpus) == 0
    log_a = json.loads((tmp_path / "a" / train.TRAIN_LOG).read_text())["loss"]
    log_b = json.loads((tmp_path / "b" / train.TRAIN_LOG).read_text())["loss"]
    assert log_a == log_b
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert log_a[-1][1] < log_a[0][1] - 0.5, "the loss falls"
    assert all(entry[2].keys() == {"lm"} and entry[2]["lm"] == pytest.approx(entry[1], abs=1e-5) for entry in log_a), \
        "without distillation or penalty the loss is the LM loss alone"


def test_the_log_keeps_each_term_of_the_loss_apart(tmp_path, corpus):
    assert run(tmp_path / "a", corpus, "--steps", "3", "--act-l1", "0.5") == 0
    log = json.loads((tmp_path / "a" / train.TRAIN_LOG).read_text())["loss"]
    for step, total, terms in log:
        assert terms.keys() == {"lm", "act_l1"} and terms["act_l1"] > 0
        assert total == pytest.approx(terms["lm"] + 0.5 * terms["act_l1"], abs=1e-5)


def test_loss_curves_smooth_and_split_into_terms():
    from pipeline.report import loss_terms, smooth

    np.testing.assert_allclose(smooth([1, 3, 5, 7], 2), [1, 2, 4, 6])
    curve = [[1, 3.0, {"lm": 2.0, "kd_ce_logits": 1.0}], [2, 2.5, {"lm": 1.5, "kd_ce_logits": 1.0}], [3, 9.0]]
    assert loss_terms(curve) == {"lm": ([1, 2], [2.0, 1.5]), "kd_ce_logits": ([1, 2], [1.0, 1.0])}


def test_lr_schedule_warms_up_then_decays():
    lrs = [train.lr_at(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_batches_cut_one_global_draw_per_step(corpus):
    tokens = np.load(corpus / "train.npy", mmap_mode="r")
    x, y = train.batch_at(tokens, 5, 0, 4, 16, 0)
    assert torch.equal(x, train.batch_at(tokens, 5, 0, 4, 16, 0)[0])
    assert torch.equal(x[:, 1:], y[:, :-1])
    halves = [train.batch_at(tokens, 5, part, 2, 16, 0)[0] for part in (0, 1)]
    assert torch.equal(torch.cat(halves), x), "two ranks (or micro-batches) of 2 see the 4 sequences of one"
    assert not torch.equal(train.batch_at(tokens, 6, 0, 4, 16, 0)[0], x)


def test_torchrun_command():
    cmd = launch.torchrun_command(["--steps", "3"], nproc_per_node=2)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone",
                       "-m", "pipeline.train", "--steps", "3"]
    multi = launch.torchrun_command([], 8, nnodes=2, rdzv_endpoint="host:29500")
    assert "--rdzv_endpoint=host:29500" in multi and "--standalone" not in multi


def test_auto_precision_picks_bf16_on_a_cpu_only_with_native_bf16():
    from pipeline.precision import resolve

    assert resolve("auto", "cuda") == "bf16"
    assert resolve("auto", "cpu", native_bf16=lambda: True) == "bf16"  # AVX512-BF16 or AMX
    assert resolve("auto", "cpu", native_bf16=lambda: False) == "fp32"  # emulated bf16: slower
    assert resolve("fp32", "cpu", native_bf16=lambda: True) == "fp32"
    with pytest.raises(ValueError, match="precision 'fp8' is not one of auto, fp32, bf16, fp16"):
        resolve("fp8", "cpu")


def test_qat_float_backward_runs_in_the_forwards_autocast_precision():
    from kernels.gemm import linear

    torch.manual_seed(0)
    x, w = torch.randn(64, 96, requires_grad=True), torch.randn(48, 96, requires_grad=True)
    g = torch.randn(64, 48)
    linear(x, w, int8=True, grad="float").backward(g)
    fp32 = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, int8=True, grad="float")
    y.backward(g)
    for ours, ref in zip((x.grad, w.grad), fp32):
        assert ours.dtype == torch.float32
        assert not torch.equal(ours, ref), "the products ran in bf16"
        torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
