"""gc never removes what a live run holds: a build in progress keeps its scratch directory (its
resume checkpoint and logs), and gc says what it skipped."""
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.chain  # a chain of stages through luigi: the chain tier
def test_gc_skips_the_version_a_live_run_is_building(project):
    p = project
    p.luigi("Corpus")
    args = ["--BaseModel-steps", "400", "--BaseModel-save-interval", "5", "--BaseModel-seed", "7"]
    run = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", "BaseModel", *args], cwd=p.root,
                           env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(p.artifacts.glob("BaseModel/.scratch-*/resume/checkpoint.json")):
            assert run.poll() is None and time.time() < deadline, "the build never saved a checkpoint"
            time.sleep(0.1)
        [scratch] = p.artifacts.glob("BaseModel/.scratch-*")
        dry = p.run("-m", "tasks.gc", "--dry-run").stdout  # the current graph: another BaseModel version
        assert f"skipping {scratch}" in dry and f"the run with pid {run.pid} is building BaseModel" in dry, dry
        gc = p.run("-m", "tasks.gc").stdout
        assert f"skipping {scratch}" in gc and "skipped 1 that a live run is building" in gc, gc
        assert (scratch / "resume" / "checkpoint.json").is_file(), "the live run's resume state is kept"
        assert run.poll() is None, "the build is still running"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    gc = p.run("-m", "tasks.gc").stdout  # the run is gone: its scratch is garbage now
    assert f"removing {scratch}" in gc and not scratch.exists(), gc
    assert not list(p.artifacts.glob("BaseModel/.lock-*")), "gc leaves no lock file behind"


@pytest.mark.chain  # a chain of stages through luigi: the chain tier
def test_gc_keeps_every_models_newest_work_and_says_why_the_rest_goes(project):
    """gc under another MODEL= keeps what this model built last; only a superseded version goes,
    and --only-current refuses to leave a stage with nothing published."""
    p = project
    p.luigi("BaseModel")
    [current] = p.versions("BaseModel")
    p.luigi("BaseModel", "--BaseModel-steps", "3")  # an experiment, built after
    [newest] = [v for v in p.versions("BaseModel") if v != current]
    [corpus] = p.versions("Corpus")
    other = ("--pipeline-model", "gpt-j-tiny")

    dry = p.run("-m", "tasks.gc", "--dry-run", *other).stdout
    assert f"would remove {p.artifacts / 'BaseModel' / current} " in dry, dry
    assert f"superseded by {newest}, a newer build of the same stage instance" in dry
    assert dry.count("would remove") == 1 and "kept 0 current version(s) and 2 other(s)" in dry, dry

    refused = p.run("-m", "tasks.gc", "--only-current", *other, check=False)
    assert refused.returncode == 2 and "the last published version of BaseModel, Corpus; nothing was removed" \
        in refused.stderr, refused.stderr
    assert sorted(p.versions("BaseModel")) == sorted([current, newest]) and p.versions("Corpus") == [corpus]

    kept = p.run("-m", "tasks.gc").stdout  # this model's current graph, and its newest experiment
    assert "0 path(s)" in kept and len(p.versions("BaseModel")) == 2, kept

    gone = p.run("-m", "tasks.gc", "--only-current", "--allow-last", *other).stdout
    assert gone.count("removing") == 3 and "not in the current graph (--only-current)" in gone, gone
    assert not p.versions("BaseModel") and not p.versions("Corpus")


def test_a_closed_stdout_ends_a_command_quietly(project):
    """``make status | head``: the reader goes away before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "tasks.status"], cwd=project.root, env=project.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
