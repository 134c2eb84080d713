"""The ReluModel stage through Luigi: its metrics, and a rank killed mid-run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Project
from test_crash import link_store


def manifest(project, stage):
    [path] = project.artifacts.glob(f"{stage}/*/manifest.json")
    return json.loads(path.read_text())


def training_ranks(save_dir_fragment):
    """PIDs of torchrun workers (processes with a RANK) training into the given directory."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = dict(line.split(b"=", 1) for line in (proc / "environ").read_bytes().split(b"\0") if b"=" in line)
        except OSError:
            continue
        if b"pipeline.train" in cmdline and any(save_dir_fragment.encode() in a for a in cmdline) and b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = int(proc.name)
    return ranks


def test_relu_stage_records_its_numbers_and_survives_a_killed_rank(chain, tmp_path):
    """On the chain's Corpus and BaseModel (a copy of its store without ReluModel)."""
    project = Project(chain.root)
    project.artifacts = tmp_path / "artifacts"
    project.env = {**chain.env, "PIPELINE_ARTIFACTS": str(project.artifacts)}
    link_store(chain.artifacts, project.artifacts, without="ReluModel")
    args = ["--pipeline-nproc-per-node", "2", "--ReluModel-steps", "120", "--ReluModel-save-interval", "10"]
    luigi = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", "ReluModel", *args],
                             cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(project.artifacts.glob("ReluModel/.scratch-*/resume/checkpoint.json")):
        time.sleep(0.2)
    ranks = training_ranks("ReluModel/.scratch-")
    assert 1 in ranks, f"no rank 1 found: {ranks}"
    os.kill(ranks[1], signal.SIGKILL)
    out, _ = luigi.communicate(timeout=300)
    assert luigi.returncode != 0
    assert "error: ReluModel: a training rank was killed by SIGKILL; a rerun resumes from the checkpoint in" in out, \
        [line for line in out.splitlines() if "error" in line.lower()][-5:]
    assert not list(project.artifacts.glob("ReluModel/*/manifest.json"))
    [scratch] = project.artifacts.glob("ReluModel/.scratch-*")
    assert f"(each rank's output: {scratch / 'resume' / 'ranks'})" in out
    logs = {p.relative_to(scratch).parts[-2:] for p in scratch.glob("resume/ranks/**/*.log")}
    assert logs == {(r, f) for r in ("0", "1") for f in ("stdout.log", "stderr.log")}, logs
    survivor = next(scratch.glob("resume/ranks/**/0/stdout.log")).read_text()
    assert "step 10 loss" in survivor, "rank 0's own log holds its progress"

    rerun = project.luigi("ReluModel", *args)
    assert "resuming from step" in rerun.stdout + rerun.stderr
    m = manifest(project, "ReluModel")["metrics"]
    assert m["world_size"] == 2 and m["tokens_seen"] == 120 * 8 * 64
    assert len(m["ffn_sparsity"]) == 2 and all(0 < s < 1 for s in m["ffn_sparsity"])
    assert m["perplexity_ratio"] == round(m["valid_perplexity"] / m["teacher_valid_perplexity"], 4)
    assert json.loads((project.artifacts / "ReluModel" / manifest(project, "ReluModel")["version"]
                       / "config.json").read_text())["activation_function"] == "relu"
    st = project.status(*args)
    assert [st[s]["state"] for s in ("Corpus", "BaseModel", "ReluModel")] == ["up-to-date"] * 3
