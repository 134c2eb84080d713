"""Crash anywhere, lose nothing: each stage is built in a copy of the chain's store without it,
its whole process tree is killed with SIGKILL (at two random points of its work, and at one step
of publishing), and the rerun must publish what the uninterrupted chain published: every payload
byte for byte (logs and wall-clock figures aside), and never a version directory without a valid
manifest in between. Training resumes from its last checkpoint, the hidden-state dump from its
last complete shard."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import TWO_RANKS
from pipeline.artifacts import CRASH_ENV, Artifact

STAGES = ["Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters", "Routers", "Moefied",
          "PruningMasks", "FinalCompressed", "Report"]
TRAINING = {"BaseModel", "ReluModel", "FinalCompressed"}
PUBLISH_STEPS = ["before-manifest", "before-rename", "after-rename"]
# for the second random kill of a stage that saves progress: wait for its first saved piece
MILESTONES = {"BaseModel": "resume/checkpoint.pt", "ReluModel": "resume/checkpoint.pt",
              "FinalCompressed": "resume/checkpoint.pt", "HiddenStates": "shard-*-0000.h5"}
# files that hold wall-clock times: logs, the training log's timings, the Report's speed table
TIMED = {"stage.log", "train.log", "dump.log", "train_log.json"}
TIMED_BY_STAGE = {"Report": {"report.md"}}


def crash_cases():
    for i, stage in enumerate(STAGES):
        yield stage, "random", 2 * i
        yield stage, "random", 2 * i + 1
        yield stage, PUBLISH_STEPS[i % len(PUBLISH_STEPS)], None


def link_store(src: Path, dst: Path, without: str) -> None:
    """A copy of the store by hard links (payloads are never written in place), minus every
    version of ``without`` and minus the lock files (which runs do write)."""
    def ignore(directory, names):
        return [n for n in names if n.startswith(".lock-") or (Path(directory) == src and n == without)]
    shutil.copytree(src, dst, copy_function=os.link, ignore=ignore)


def visible_versions(store: Path) -> list[Path]:
    return [v for stage in store.iterdir() if stage.is_dir() and not stage.name.startswith(".")
            for v in stage.iterdir() if not v.name.startswith(".")]


def assert_every_visible_version_is_valid(store: Path) -> None:
    for version in visible_versions(store):
        manifest = json.loads((version / "manifest.json").read_text())  # present and whole
        Artifact(version, manifest).verify()


def survivors(store: Path) -> list[int]:
    """Processes still running for this store (found by their environment)."""
    needle = f"PIPELINE_ARTIFACTS={store}".encode()
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


def kill_tree_when(proc: subprocess.Popen, store: Path, stage: str, delay: float, milestone: str | None = None,
                   timeout: float = 120) -> bool:
    """SIGKILL the run's process tree ``delay`` seconds after the stage's scratch directory appears
    (or after ``milestone`` appears in it); False if the run ended first."""
    deadline = time.time() + timeout
    while not list((store / stage).glob(f".scratch-*/{milestone or ''}".rstrip("/"))):
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, f"{stage} never reached {milestone or 'its start'}"
        time.sleep(0.01)
    end = time.time() + delay
    while time.time() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def compare_with_chain(stage: str, rebuilt: Path, reference: Path) -> dict:
    new, ref = (json.loads((p / "manifest.json").read_text()) for p in (rebuilt, reference))
    assert set(new["files"]) == set(ref["files"])
    timed = TIMED | TIMED_BY_STAGE.get(stage, set())
    differ = sorted(n for n in ref["files"] if n not in timed and new["files"][n]["sha256"] != ref["files"][n]["sha256"])
    if stage in TRAINING:
        # training is required to match within tolerance; the figures say whether it was exact
        a, b = load_file(str(rebuilt / "model.safetensors")), load_file(str(reference / "model.safetensors"))
        worst = max((a[k] - b[k]).abs().max().item() for k in b)
        assert worst <= 1e-4, f"{stage}: weights differ by up to {worst}"
        assert new["metrics"]["valid_perplexity"] == pytest.approx(ref["metrics"]["valid_perplexity"], rel=1e-3)
        return {"exact": not differ, "max_weight_difference": worst}
    assert differ == [], f"{stage}: {differ} differ from the uninterrupted build"
    assert untimed(new["metrics"]) == untimed(ref["metrics"])
    same = ("stage", "version", "params", "upstream", "code")
    assert {k: new[k] for k in same} == {k: ref[k] for k in same}
    return {"exact": True}


def untimed(obj):
    """Metrics without the wall-clock figures (throughputs, seconds, speed ratios)."""
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if not any(t in k for t in ("per_s", "seconds", "speed"))}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


@pytest.mark.parametrize("stage, kill, seed", list(crash_cases()),
                         ids=[f"{s}-{k}{'' if n is None else n}" for s, k, n in crash_cases()])
def test_killed_stage_reruns_to_the_uninterrupted_result(chain, tmp_path, stage, kill, seed):
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without=stage)
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    run_env = {**env, CRASH_ENV: kill} if kill != "random" else env
    cmd = [sys.executable, "-m", "luigi", "--module", "tasks", stage, *TWO_RANKS]
    proc = subprocess.Popen(cmd, cwd=chain.root, env=run_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    milestone = None
    if kill == "random":
        duration = _chain_duration(chain, stage)
        milestone = MILESTONES.get(stage) if seed % 2 else None
        share = 0.1 if milestone else 0.9  # after a milestone: within the next checkpoint interval or shard
        killed = kill_tree_when(proc, store, stage, random.Random(seed).uniform(0.0, share) * duration, milestone)
        assert killed, f"{stage} finished before the kill (it took {duration} s in the chain)"
    else:
        assert proc.wait(timeout=300) == -signal.SIGKILL, f"the crash at {kill} did not happen"

    deadline = time.time() + 5
    while survivors(store) and time.time() < deadline:
        time.sleep(0.1)
    assert survivors(store) == [], "a process of the killed run is still running"
    assert_every_visible_version_is_valid(store)
    resumable = {p.relative_to(store).as_posix() for p in store.glob(f"{stage}/.scratch-*/**/*")
                 if p.is_file() and ("resume" in p.parts or p.name.startswith("shard-"))}

    rerun = subprocess.run(cmd, cwd=chain.root, env=env, capture_output=True, text=True, timeout=600)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert_every_visible_version_is_valid(store)
    [rebuilt] = [p for p in visible_versions(store) if p.parent.name == stage]
    reference = chain.artifacts / stage / rebuilt.name
    assert reference.is_dir(), f"the rerun built {stage} {rebuilt.name}, which the chain did not"
    assert not list((store / stage).glob(".scratch-*")), "the rerun leaves no scratch directory"
    result = compare_with_chain(stage, rebuilt, reference)

    if kill == "before-rename":
        assert "published it without rebuilding" in log, "a finished build was redone"
    if kill == "after-rename":
        assert "building in" not in log, "a published build was redone"
    if milestone:
        assert resumable, f"{stage}: nothing resumable was left by a kill after {milestone}"
    if any("resume/checkpoint.pt" in p for p in resumable):
        assert "resuming from step" in log, "training restarted from zero despite a checkpoint"
    if any(Path(p).name.startswith("shard-") and Path(p).suffix == ".h5" for p in resumable):
        assert "complete shard(s) kept from an earlier run" in log
    _record(stage, kill, seed, resumable, result)


def _chain_duration(chain, stage) -> float:
    totals = [json.loads(m.read_text())["timings"]["total"] for m in (chain.artifacts / stage).glob("*/manifest.json")]
    return max(totals)


def _record(stage, kill, seed, resumable, result) -> None:
    """One line per case in a session file (read by the closing note's counts, not by any assert)."""
    path = os.environ.get("CRASH_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "kill": kill, "seed": seed,
                                "resumable_files": len(resumable), **result}) + "\n")
