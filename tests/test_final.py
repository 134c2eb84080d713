"""FinalCompressed and Report on the smoke chain (the session's ``chain``, through `make compress`
with two torchrun ranks): the combination trains with every method on, its exports load in
transformers and in pipeline.generate, the report compares every variant, and changing only
[FinalCompressed] settings reruns only FinalCompressed and Report."""
import json
import sys
from pathlib import Path

import torch

import commands
from conftest import TWO_RANKS, artifact
from pipeline.models import from_pretrained

ALL_ON = {"int8": True, "pruning": True, "moe": True, "distill": True}
STAGES = ("Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters", "Routers", "PruningMasks",
          "FinalCompressed", "Report")


def final(chain):
    return artifact(chain, "FinalCompressed", lambda m: m["metrics"]["toggles"] == ALL_ON)


def test_the_combination_trains_with_every_method(chain):
    path, manifest = final(chain)
    m = manifest["metrics"]
    assert manifest["params"]["world_size"] == 2 and m["world_size"] == 2
    assert set(manifest["upstream"]) == {"Corpus", "BaseModel", "ReluModel", "Routers", "PruningMasks"}
    assert m["variant"] == "int8 QAT + 2:4 + MoE + KD" and m["moe_topk"] == 2
    assert m["pruned_weight_zeros"] >= 0.5, "the 2:4 masks were held"
    assert len(m["loss_curve"]) == 3 and m["tokens_seen"] == 12 * 8 * 64
    # the deployed int8 model computes (nearly) what was trained, and it is small
    assert abs(m["compressed_valid_perplexity"] / m["valid_perplexity"] - 1) < 0.02
    assert abs(m["compressed_exact_valid_perplexity"] / m["valid_perplexity"] - 1) < 0.005
    assert m["compressed_size_ratio"] < 0.35 and m["compressed_bytes"] < 0.35 * m["teacher_bytes"]
    # masks searched in the experts' order stay 2:4 once the export permutes the neurons: all 6 matrices of both layers
    assert m["compressed_sparse_matrices"] == 12
    # fidelity to the teacher (the smoke BaseModel evaluated other windows, so the teacher was evaluated again)
    _, base = artifact(chain, "BaseModel")
    assert base["params"]["eval_tokens"] != manifest["params"]["eval_tokens"]
    assert m["teacher_valid_perplexity"] != base["metrics"]["valid_perplexity"]
    assert m["kl"] > 0 and 0 < m["top1_agreement"] < 1 and 0 <= m["greedy_agreement"] <= 32
    for name in ("config.json", "model.safetensors", "tokenizer.json", "clusters.safetensors", "routers.safetensors",
                 "compressed/config.json", "compressed/model.int8.safetensors", "compressed/routers.safetensors",
                 "compressed/experts.safetensors", "compressed/tokenizer.json"):
        assert (path / name).is_file(), name
    state = from_pretrained(path).state_dict()
    fc_in = state["transformer.h.0.mlp.fc_in.weight"]
    assert (fc_in == 0).float().mean() >= 0.5
    # every variant of the report, and nothing else
    variants = sorted(m["metrics"]["variant"] for m in (json.loads(p.read_text()) for p in
                                                       chain.artifacts.glob("FinalCompressed/*/manifest.json")))
    assert {"2:4 + KD", "int8 QAT + KD", "int8 QAT + 2:4 + KD", "int8 QAT + 2:4 + MoE + KD"} <= set(variants)


def test_hf_export_loads_in_transformers_with_the_projects_logits(chain):
    from transformers import GPTJForCausalLM

    path, _ = final(chain)
    config = json.loads((path / "config.json").read_text())
    assert config["activation_function"] == "relu" and config["model_type"] == "gptj"
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = GPTJForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, from_pretrained(path)(ids), rtol=1e-4, atol=1e-4)


def test_generate_runs_from_the_final_artifact(chain):
    path, _ = final(chain)
    texts = []
    for moe_path in ("sparse", "dense", "auto"):
        run = chain.run("-m", "pipeline.generate", "--model", str(path), "--prompt", "def main(", "--max-new-tokens",
                        "8", "--moe-path", moe_path)
        text, summary = run.stdout.strip().rsplit("\n", 1)
        assert text.startswith("def main(")
        assert summary.startswith("--- prefill ") and ", decode 7 tokens at " in summary and "int8 MoE model from" in summary
        texts.append(text)
    assert len(texts[0]) > len("def main(")


def test_report_compares_every_variant(chain):
    path, manifest = artifact(chain, "Report")
    rows = {r["name"]: r for r in manifest["metrics"]["rows"]}
    control = "control: KD, nothing compressed"
    assert list(rows) == ["teacher", "ReLU", "MoE 25% experts", control, "MoE + KD", "2:4 + KD", "int8 QAT + KD",
                          "int8 + 2:4 + KD", "final: int8 QAT + 2:4 + MoE + KD", "int8 PTQ (no training)"]
    teacher = rows["teacher"]
    assert teacher["perplexity_ratio"] == 1.0 and teacher["decode_speed_ratio"] == 1.0
    assert teacher["kl"] < 1e-6 and teacher["top1_agreement"] == 1.0 and teacher["greedy_agreement"] == 32
    assert rows[control]["control_ratio"] == 1.0
    for r in rows.values():
        assert r["control_ratio"] == round(r["perplexity"] / rows[control]["perplexity"], 4)
        assert 0 <= r["top1_agreement"] <= 1 and 0 <= r["greedy_agreement"] <= 32 and r["kl"] >= 0, r
    assert rows["ReLU"]["kl"] > 0 and rows["ReLU"]["top1_agreement"] < 1
    _, base = artifact(chain, "BaseModel")
    assert abs(teacher["perplexity"] - base["metrics"]["valid_perplexity"]) < 0.05 * teacher["perplexity"]
    _, fin = final(chain)
    assert rows["final: int8 QAT + 2:4 + MoE + KD"]["bytes"] == fin["metrics"]["compressed_bytes"]
    for name in ("int8 QAT + KD", "int8 PTQ (no training)", "final: int8 QAT + 2:4 + MoE + KD"):
        assert rows[name]["size_ratio"] < 0.35, name
    assert rows["2:4 + KD"]["size_ratio"] == 1.0  # dense storage
    # the deployed models the FinalCompressed runs evaluated on these windows are not evaluated again
    variants = {control: "KD", "2:4 + KD": "2:4 + KD", "int8 QAT + KD": "int8 QAT + KD",
                "int8 + 2:4 + KD": "int8 QAT + 2:4 + KD",
                "final: int8 QAT + 2:4 + MoE + KD": "int8 QAT + 2:4 + MoE + KD"}
    for name, variant in variants.items():
        _, run = artifact(chain, "FinalCompressed", lambda m, v=variant: m["metrics"]["variant"] == v)
        figures = run["metrics"]["deployed_evaluation"]
        assert rows[name]["perplexity"] == round(figures["perplexity"], 4), name
        assert [rows[name][k] for k in ("kl", "top1_agreement", "greedy_agreement")] == \
            [round(figures[k], 5) for k in ("kl", "top1_agreement", "greedy_agreement")], name
    _, moe_kd = artifact(chain, "FinalCompressed", lambda m: m["metrics"]["variant"] == "MoE + KD")
    assert "deployed_evaluation" not in moe_kd["metrics"]  # its sparse MoE path is the Report's to evaluate
    evaluated = (path / "evaluate.log").read_text()
    assert "MoE + KD" in evaluated and "int8 PTQ" in evaluated and not any(f"{n}:" in evaluated for n in variants)
    for r in rows.values():
        assert r["perplexity"] > 1 and r["decode_tokens_per_s"] > 0 and r["prefill_128_tokens_per_s"] > 0, r
    text = (path / "report.md").read_text()
    for name in rows:
        assert f"| {name} |" in text
    for png in ("loss_curves.png", "ffn_sparsity.png", "router_coverage.png", "perplexity_size.png", "fidelity.png"):
        assert (path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text


def test_changing_final_settings_reruns_only_final_and_report(chain, tmp_path):
    before = {s: chain.versions(s) for s in STAGES}
    edited = tmp_path / "edited.cfg"  # the smoke configuration with one [FinalCompressed] setting changed
    text = Path(chain.env["LUIGI_CONFIG_PATH"]).read_text()
    edited.write_text(text.replace("[FinalCompressed]\n", "[FinalCompressed]\nint8 = false\n", 1))
    commands.run([sys.executable, "-m", "luigi", "--module", "tasks", "Report", *TWO_RANKS], roots=[chain.artifacts],
                 cwd=chain.root, env={**chain.env, "LUIGI_CONFIG_PATH": str(edited)})
    new = {s: sorted(set(chain.versions(s)) - set(before[s])) for s in STAGES}
    assert {s: len(v) for s, v in new.items() if v} == {"FinalCompressed": 1, "Report": 1}
    manifest = json.loads((chain.artifacts / "Report" / new["Report"][0] / "manifest.json").read_text())
    rows = {r["name"]: r for r in manifest["metrics"]["rows"]}
    assert "final: 2:4 + MoE + KD" in rows  # the MoE runs sparse in fp32 when int8 is off
    assert rows["final: 2:4 + MoE + KD"]["size_ratio"] > 1.0
    dense_moe = chain.artifacts / "FinalCompressed" / new["FinalCompressed"][0]
    assert not (dense_moe / "compressed").exists()
    run = chain.run("-m", "pipeline.generate", "--model", str(dense_moe), "--prompt", "x = ", "--max-new-tokens", "3")
    assert "; dense fp32 MoE model from" in run.stdout  # generate runs it as the MoE it was trained as


class Recorded:
    def __init__(self, seq_len, eval_tokens, figures):
        self.manifest = {"params": {"seq_len": seq_len, "eval_tokens": eval_tokens}}
        self.metrics = {"deployed_evaluation": figures} if figures else {}


def test_the_report_reads_a_runs_own_evaluation_only_for_the_same_windows():
    from tasks.final_compressed import deployed_figures, recorded_deployed

    result = {"perplexity": 40.5, "kl": 0.01, "top1_agreement": 0.97, "greedy_agreement": 25.0, "loss": 3.7, "tokens": 64}
    figures = deployed_figures(result)
    assert figures == {"perplexity": 40.5, "kl": 0.01, "top1_agreement": 0.97, "greedy_agreement": 25.0}
    assert recorded_deployed(Recorded(128, 65536, figures), 128, 65536) == figures
    assert recorded_deployed(Recorded(128, 65536, figures), 64, 65536) is None
    assert recorded_deployed(Recorded(128, 65536, figures), 128, 4096) is None
    assert recorded_deployed(Recorded(128, 65536, None), 128, 65536) is None  # a MoE run without int8
