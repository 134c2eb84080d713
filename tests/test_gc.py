"""gc never removes what a live run holds: a build in progress keeps its scratch directory (its
resume checkpoint and logs), and gc says what it skipped."""
import os
import signal
import subprocess
import sys
import time


def test_gc_skips_the_version_a_live_run_is_building(project):
    p = project
    p.luigi("Corpus")
    args = ["--BaseModel-steps", "400", "--BaseModel-save-interval", "5", "--BaseModel-seed", "7"]
    run = subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", "BaseModel", *args], cwd=p.root,
                           env=p.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(p.artifacts.glob("BaseModel/.scratch-*/resume/checkpoint.pt")):
            assert run.poll() is None and time.time() < deadline, "the build never saved a checkpoint"
            time.sleep(0.1)
        [scratch] = p.artifacts.glob("BaseModel/.scratch-*")
        dry = p.run("-m", "tasks.gc", "--dry-run").stdout  # the current graph: another BaseModel version
        assert f"skipping {scratch}" in dry and f"the run with pid {run.pid} is building BaseModel" in dry, dry
        gc = p.run("-m", "tasks.gc").stdout
        assert f"skipping {scratch}" in gc and "skipped 1 that a live run is building" in gc, gc
        assert (scratch / "resume" / "checkpoint.pt").is_file(), "the live run's resume state is kept"
        assert run.poll() is None, "the build is still running"
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    gc = p.run("-m", "tasks.gc").stdout  # the run is gone: its scratch is garbage now
    assert f"removing {scratch}" in gc and not scratch.exists(), gc
    assert not list(p.artifacts.glob("BaseModel/.lock-*")), "gc leaves no lock file behind"
