"""Evaluation on several ranks: the windows split over them, the sums reduced, and the result the
same as one rank's, bit for bit, whatever the world size."""
import json

import numpy as np
import pytest
import torch

import commands
from pipeline import launch
from pipeline.evaluate import greedy_agreement, job, run_jobs, teacher_continuations
from pipeline.models import GPTJ, from_pretrained, get_preset, save_pretrained

pytestmark = pytest.mark.slow  # torchrun


def test_two_ranks_evaluate_exactly_what_one_rank_does(tmp_path):
    world = 2
    torch.manual_seed(0)
    save_pretrained(GPTJ(get_preset("gpt-j-smoke").replace(activation="relu")), tmp_path / "model")
    tokens = np.random.default_rng(0).integers(0, 512, size=2721).astype(np.uint16)  # 85 windows: 11 batches, 6 and 5 per rank
    np.save(tmp_path / "valid.npy", tokens)
    perturbed(tmp_path / "model", tmp_path / "student")
    jobs = [job("relu", from_pretrained, ffn_sparsity=True, path=str(tmp_path / "model")),
            job("student, 1000 tokens, against the relu model", from_pretrained, path=str(tmp_path / "student"))]
    references = (None, job("teacher", from_pretrained, path=str(tmp_path / "model")))
    one = {j["name"]: run_jobs([j], tokens, 32, max_tokens, reference=ref)
           for j, max_tokens, ref in zip(jobs, (0, 1000), references)}

    results = {}
    for spec, max_tokens, ref in zip(jobs, (0, 1000), references):
        plan = tmp_path / "jobs.json"
        plan.write_text(json.dumps({"tokens": str(tmp_path / "valid.npy"), "seq_len": 32, "max_tokens": max_tokens,
                                    "jobs": [spec], "reference": ref}))
        cmd = launch.torchrun_command(["--job", str(plan), "--out", str(tmp_path / "out.json")], world,
                                      module="pipeline.evaluate")
        commands.run(cmd, timeout=300)
        results[spec["name"]] = json.loads((tmp_path / "out.json").read_text())
    assert results == one
    student = one[jobs[1]["name"]][jobs[1]["name"]]
    assert one["relu"]["relu"]["tokens"] == 85 * 32 and student["tokens"] == 31 * 32
    assert len(one["relu"]["relu"]["ffn_sparsity"]) == 2
    assert student["kl"] > 0 and 0 < student["top1_agreement"] < 1 and 0 <= student["greedy_agreement"] < 32


def perturbed(source, target, scale=0.05):
    model = from_pretrained(source)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    save_pretrained(model, target)


def test_fidelity_to_itself_is_perfect_and_greedy_agreement_is_free_running_generation(tmp_path):
    torch.manual_seed(0)
    save_pretrained(GPTJ(get_preset("gpt-j-smoke")), tmp_path / "teacher")
    perturbed(tmp_path / "teacher", tmp_path / "student", scale=0.1)
    tokens = np.random.default_rng(0).integers(0, 512, size=700).astype(np.uint16)
    teacher = job("teacher", from_pretrained, path=str(tmp_path / "teacher"))
    results = run_jobs([teacher, job("student", from_pretrained, path=str(tmp_path / "student"))], tokens, 32, 0,
                       reference=teacher, prompts=6, new_tokens=12)
    assert results["teacher"]["kl"] == pytest.approx(0, abs=1e-9)
    assert results["teacher"]["top1_agreement"] == 1 and results["teacher"]["greedy_agreement"] == 12
    assert results["student"]["kl"] > 1e-6

    t, s = from_pretrained(tmp_path / "teacher").eval(), from_pretrained(tmp_path / "student").eval()
    continuations = teacher_continuations(t, tokens, prompts=6, prompt_len=32, new_tokens=12)
    free = []
    with torch.no_grad():
        for seq in continuations.values():  # the student generating on its own, token by token
            x = seq[:, :32]
            for _ in range(12):
                x = torch.cat([x, s(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
            same = (x[:, 32:] == seq[:, 32:]).long().cumprod(dim=1).sum()
            free.append(float(same))
    assert greedy_agreement(s, continuations, 6, 12) == pytest.approx(np.mean(free))
    assert results["student"]["greedy_agreement"] == pytest.approx(np.mean(free))
    assert 0 < np.mean(free) < 12, "a case where they part somewhere in between"


def test_a_base_models_recorded_perplexity_is_reused_only_for_the_same_evaluation():
    from types import SimpleNamespace

    from tasks.base_model import recorded_perplexity

    base = SimpleNamespace(manifest={"params": {"seq_len": 128, "eval_tokens": 65536}},
                           metrics={"valid_perplexity": 48.68})
    assert recorded_perplexity(base, 128, 65536) == 48.68
    assert recorded_perplexity(base, 64, 65536) is None and recorded_perplexity(base, 128, 4096) is None


def test_the_teacher_runs_once_per_batch_for_all_models_and_changes_no_figure(tmp_path, monkeypatch):
    import pipeline.evaluate as evaluate
    from pipeline import resources

    torch.manual_seed(0)
    save_pretrained(GPTJ(get_preset("gpt-j-smoke")), tmp_path / "teacher")
    for i, scale in enumerate((0.05, 0.1, 0.2)):
        perturbed(tmp_path / "teacher", tmp_path / f"s{i}", scale=scale)
    tokens = np.random.default_rng(0).integers(0, 512, size=1500).astype(np.uint16)  # 46 windows: 6 batches
    students = [job(f"s{i}", from_pretrained, path=str(tmp_path / f"s{i}")) for i in range(3)]
    calls = []
    real = evaluate.TeacherOutputs.__init__

    def counted(self, model):
        real(self, model)
        model.register_forward_hook(lambda *_: calls.append(1))

    def run(budget):
        calls.clear()
        monkeypatch.setattr(resources, "TEACHER_CACHE_BYTES", budget)
        monkeypatch.setattr(evaluate.TeacherOutputs, "__init__", counted)
        teacher = job("teacher", from_pretrained, path=str(tmp_path / "teacher"))
        out = run_jobs(students, tokens, 32, 0, reference=teacher, prompts=2, new_tokens=4)
        return out, len(calls)

    kept, kept_calls = run(resources.TEACHER_CACHE_BYTES)
    one_batch = 8 * 32 * 512 * 4  # bytes of one batch's log-probabilities
    partly, partly_calls = run(2 * one_batch)
    recomputed, recomputed_calls = run(0)
    assert kept == partly == recomputed  # bit for bit
    assert (kept_calls, partly_calls, recomputed_calls) == (6, 6 + 2 * 4, 3 * 6)
    assert all(r["kl"] > 0 and r["top1_agreement"] < 1 for r in kept.values())
