"""The real Luigi chain on the smoke preset: staleness, status reasons, reuse, gc, two ranks."""
import json
from pathlib import Path

import pytest


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.chain  # a chain of stages through luigi: the chain tier
def test_only_stale_stages_rerun_and_status_says_why(project):
    p = project
    cfg = p.root / "smoke.cfg"
    cfg.write_text(Path(p.env["LUIGI_CONFIG_PATH"]).read_text())
    p.env["LUIGI_CONFIG_PATH"] = str(cfg)

    st = p.status()
    assert [st[s]["state"] for s in ("Corpus", "BaseModel", "ReluModel")] == ["missing"] * 3
    assert st["Corpus"]["reasons"] == ["never built"]

    p.luigi("BaseModel")
    st = p.status()
    assert st["Corpus"]["state"] == st["BaseModel"]["state"] == "up-to-date"
    assert st["ReluModel"]["state"] == "missing", "the graph goes on past what was built"
    [corpus_v] = p.versions("Corpus")
    [base_v] = p.versions("BaseModel")
    assert st["Corpus"]["version"] == corpus_v and st["BaseModel"]["version"] == base_v
    corpus_before = snapshot(p.artifacts / "Corpus" / corpus_v)
    manifest = json.loads((p.artifacts / "BaseModel" / base_v / "manifest.json").read_text())
    assert manifest["upstream"] == {"Corpus": corpus_v}
    assert manifest["metrics"]["valid_perplexity"] < 512, "the smoke model learns something (vocab is 512)"
    assert manifest["metrics"]["tokens_seen"] == 30 * 8 * 64
    assert "tasks/base_model.py" in manifest["code"]["files"]

    # A BaseModel parameter on the command line: only BaseModel reruns; Corpus is reused byte for byte.
    st = p.status("--BaseModel-steps", "31")
    assert st["Corpus"]["state"] == "up-to-date"
    assert st["BaseModel"]["state"] == "stale"
    assert st["BaseModel"]["reasons"] == ["parameter steps changed from 30 to 31"]
    out = p.luigi("BaseModel", "--BaseModel-steps", "31")
    assert "1 ran successfully" in out.stderr + out.stdout
    assert p.versions("Corpus") == [corpus_v]
    assert len(p.versions("BaseModel")) == 2
    assert snapshot(p.artifacts / "Corpus" / corpus_v) == corpus_before

    # A Corpus parameter in the config file: both rerun; BaseModel runs on two torchrun ranks.
    cfg.write_text(cfg.read_text().replace("max_bytes = 400000", "max_bytes = 300000"))
    st = p.status("--pipeline-nproc-per-node", "2")
    assert st["Corpus"]["reasons"] == ["parameter max_bytes changed from 400000 to 300000"]
    assert "parameter world_size changed from 1 to 2" in st["BaseModel"]["reasons"]
    assert any(r.startswith(f"upstream Corpus changed from {corpus_v} to ") for r in st["BaseModel"]["reasons"])
    p.luigi("BaseModel", "--pipeline-nproc-per-node", "2")
    assert len(p.versions("Corpus")) == 2 and len(p.versions("BaseModel")) == 3
    two_rank = p.status("--pipeline-nproc-per-node", "2")["BaseModel"]["version"]
    m2 = json.loads((p.artifacts / "BaseModel" / two_rank / "manifest.json").read_text())
    assert m2["params"]["world_size"] == 2
    assert "--nproc_per_node=2" in (p.artifacts / "BaseModel" / two_rank / "stage.log").read_text()

    # A comment edit in a stage's module changes nothing.
    p.edit("tasks/base_model.py", "class BaseModel(TrainingStage):",
           "# A comment nobody runs.\nclass BaseModel(TrainingStage):  # see")
    st = p.status("--pipeline-nproc-per-node", "2")
    assert st["Corpus"]["state"] == st["BaseModel"]["state"] == "up-to-date"
    out = p.luigi("BaseModel", "--pipeline-nproc-per-node", "2")
    assert "ran successfully" not in out.stderr + out.stdout
    assert len(p.versions("BaseModel")) == 3

    # A code edit reruns that stage only, and status names the file.
    p.edit("tasks/base_model.py", "class BaseModel(TrainingStage):", "NOTE = 'edited'\n\n\nclass BaseModel(TrainingStage):")
    st = p.status("--pipeline-nproc-per-node", "2")
    assert st["Corpus"]["state"] == "up-to-date"
    assert st["BaseModel"]["reasons"] == ["source file tasks/base_model.py changed"]
    p.luigi("BaseModel", "--pipeline-nproc-per-node", "2")
    assert len(p.versions("Corpus")) == 2 and len(p.versions("BaseModel")) == 4

    # gc keeps exactly the current graph; the dry run removes nothing.
    dry = p.run("-m", "tasks.gc", "--dry-run", "--pipeline-nproc-per-node", "2").stdout
    assert dry.count("would remove") == 4 and "kept 2 current version(s)" in dry
    assert len(p.versions("BaseModel")) == 4
    p.run("-m", "tasks.gc", "--pipeline-nproc-per-node", "2")
    assert len(p.versions("Corpus")) == 1 and len(p.versions("BaseModel")) == 1
    st = p.status("--pipeline-nproc-per-node", "2")
    assert st["Corpus"]["state"] == st["BaseModel"]["state"] == "up-to-date"


def test_status_text_output_lists_every_stage(project):
    out = project.run("-m", "tasks.status").stdout
    assert "Corpus" in out and "BaseModel" in out and "missing" in out and "never built" in out


def test_status_compares_an_instance_with_its_own_builds_and_labels_each(chain, tmp_path):
    """The random-split ExpertClusters, never built, is missing (not "method changed" against the
    k-means split); the two Routers sets are told apart by the clustering they train on."""
    import subprocess
    import sys

    from conftest import TWO_RANKS
    from test_crash import link_store

    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without="")
    for version in (store / "ExpertClusters").iterdir():
        if json.loads((version / "manifest.json").read_text())["params"]["method"] == "random":
            import shutil
            shutil.rmtree(version)
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    proc = subprocess.run([sys.executable, "-m", "tasks.status", "--json", *TWO_RANKS], cwd=chain.root, env=env,
                          capture_output=True, text=True, check=True)
    entries = json.loads(proc.stdout)
    [random] = [e for e in entries if e["stage"] == "ExpertClusters" and e["params"]["method"] == "random"]
    assert random["state"] == "missing" and random["reasons"] == ["never built"]
    assert "iterations" not in random["params"], "a random split has no k-means iterations"
    labels = sorted(e["label"] for e in entries if e["stage"] == "Routers")
    assert labels == ["(ExpertClusters method=balanced_kmeans)", "(ExpertClusters method=random)"]

