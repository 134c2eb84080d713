"""Bad input gets one clear sentence and a non-zero exit, and nothing is published."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest


def assert_refused(proc, message):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert message in out, out[-3000:]


def published(project):
    return sorted(p.relative_to(project.artifacts).as_posix()
                  for p in project.artifacts.glob("*/*/manifest.json")) if project.artifacts.exists() else []


def test_unknown_model(project):
    proc = project.luigi("BaseModel", "--pipeline-model", "gpt-k", check=False)
    assert_refused(proc, "error: BaseModel: unknown model 'gpt-k'; known presets: gpt-j, gpt-j-smoke, gpt-j-tiny")
    status = project.run("-m", "pipeline.status", "--pipeline-model", "gpt-k", check=False)
    assert status.returncode == 2 and "unknown model 'gpt-k'" in status.stderr
    assert published(project) == []


@pytest.mark.parametrize("make_checkpoint, message", [
    (lambda d: d / "nope", "CHECKPOINT {d}/nope does not exist"),
    (lambda d: (d / "file").write_text("x") and d / "file", "CHECKPOINT {d}/file is not a directory"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "{d}/empty/config.json is missing"),
    (lambda d: (d / "llama").mkdir() or (d / "llama" / "config.json").write_text(json.dumps(
        {"model_type": "llama"})) and d / "llama",
     "{d}/llama/config.json: field 'model_type' is 'llama', expected 'gptj'"),
])
def test_bad_checkpoint(project, tmp_path, make_checkpoint, message):
    path = make_checkpoint(tmp_path)
    proc = project.luigi("BaseModel", "--pipeline-model", "gpt-j", "--pipeline-checkpoint", str(path), check=False)
    assert_refused(proc, message.format(d=tmp_path))
    assert published(project) == []


def test_corpus_glob_matching_nothing(project, tmp_path):
    proc = project.luigi("Corpus", "--Corpus-files", str(tmp_path / "*.txt"), check=False)
    assert_refused(proc, f"Corpus files: the glob '{tmp_path}/*.txt' matches no files")


def test_wrong_type_in_config(project, tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("[BaseModel]\nsteps = many\n")
    project.env["LUIGI_CONFIG_PATH"] = str(bad)
    proc = project.luigi("BaseModel", check=False)
    assert_refused(proc, "sets [BaseModel] steps = 'many'; expected an integer")
    assert str(bad) in proc.stderr
    assert project.run("-m", "pipeline.status", check=False).returncode != 0


def test_nonpositive_training_parameter(project):
    proc = project.luigi("BaseModel", "--BaseModel-steps", "0", check=False)
    assert_refused(proc, "BaseModel steps is 0, expected a positive integer")


def test_sigkill_mid_training_resumes_and_publishes_nothing_half_written(project):
    """Kill the whole process tree once BaseModel has saved a resumable checkpoint; nothing of
    BaseModel is published, and the rerun resumes from the checkpoint and completes."""
    args = ["--BaseModel-steps", "400", "--BaseModel-save-interval", "20"]
    proc = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", "BaseModel", *args],
                            cwd=project.root, env=project.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    checkpoint = None
    while time.time() < deadline and checkpoint is None:
        checkpoint = next(iter(project.artifacts.glob("BaseModel/.scratch-*/resume/checkpoint.pt")), None)
        time.sleep(0.2)
    assert checkpoint is not None, "no resumable checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p for p in published(project) if p.startswith("BaseModel/")] == []
    assert len(published(project)) == 1, "Corpus finished before and stays published"

    out = project.luigi("BaseModel", *args)
    log = (out.stdout + out.stderr)
    assert "resuming from step" in log
    [manifest] = project.artifacts.glob("BaseModel/*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["metrics"]["tokens_seen"] == 400 * 8 * 64
    assert not list(project.artifacts.glob("BaseModel/.scratch-*")), "scratch is removed after publishing"
