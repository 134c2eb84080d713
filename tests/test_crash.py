"""Crash anywhere, lose nothing: each stage is built in a copy of the chain's store without it,
and its whole process tree is killed with SIGKILL two or three times in a row (each rerun is
killed again: just after its first saved progress when it saves any, at a random point of its
work, at one step of publishing); the last rerun must publish what the uninterrupted chain
published, every payload byte for byte (logs and wall-clock figures aside), with never a version
directory without a valid manifest in between. Training resumes from its last checkpoint, the
hidden-state dump from its last complete shard."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import commands
from conftest import TWO_RANKS
from pipeline.artifacts import CRASH_ENV, Artifact

STAGES = ["Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters", "Routers", "Moefied",
          "PruningMasks", "FinalCompressed", "Report"]
TRAINING = {"BaseModel", "ReluModel", "FinalCompressed"}
# trained tensors, compared within a tolerance like the models: router training (Adam on CPU) came
# out 2.4e-7 apart in one of about ten fresh-process rebuilds, with nothing resumed
TRAINED_FILES = {"BaseModel": "model.safetensors", "ReluModel": "model.safetensors",
                 "FinalCompressed": "model.safetensors", "Routers": "routers.safetensors"}
PUBLISH_STEPS = ["before-manifest", "before-rename", "after-rename"]
# for the first kill of a stage that saves progress: its first saved piece
MILESTONES = {"BaseModel": "resume/checkpoint.json", "ReluModel": "resume/checkpoint.json",
              "FinalCompressed": "resume/checkpoint.json", "HiddenStates": "shard-*.h5"}
# files that hold wall-clock times: logs, the training log's timings, the Report's speed table
TIMED = {"stage.log", "train.log", "dump.log", "train_log.json", "evaluate.log", "evaluate-compressed.log", "clustering.log",
         "routers.log"}  # logs of torchrun runs: their timings
# the Report's int8 PTQ export records the call sizes at which each int8 path measured faster on this
# machine (pipeline.compressed.export_compressed(calibrate=True)): timings, as a rebuild may measure them
TIMED_BY_STAGE = {"Report": {"report.md", "int8_ptq/config.json"}}


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
    """SIGKILL the run's process tree ``delay`` seconds after it starts building the stage (it
    holds the version's lock) or after it saves ``milestone`` in the scratch directory; False
    if the run ended first."""
    started = time.time()

    def reached() -> bool:
        if milestone:
            return any(p.stat().st_mtime > started for p in (store / stage).glob(f".scratch-*/{milestone}"))
        return any(lock.read_text().strip() == str(proc.pid) for lock in (store / stage).glob(".lock-*"))

    while not reached():
        if proc.poll() is not None:
            return False
        assert time.time() < started + timeout, f"{stage} never reached {milestone or 'its build'}"
        time.sleep(0.01)
    end = time.time() + delay
    while time.time() < end:
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the kill can land after the stage published, while the run shuts down: then it ended first
    return not published_since(store, stage, started)


def published_since(store: Path, stage: str, since: float) -> bool:
    return any(m.stat().st_mtime >= since for m in (store / stage).glob("[!.]*/manifest.json"))


def kill_at_random(start, log_path: Path, store: Path, stage: str, delay: float, milestone: str | None,
                   attempts: int = 6) -> float:
    """Start a run and SIGKILL it ``delay`` seconds into the stage's build (see kill_tree_when).
    The delay is drawn from the chain's own duration of the stage; a machine less loaded than it
    was then can finish first, and then (the run having succeeded) the stage's directory is put
    back as it was, its saved progress included, and the run starts again with half the delay.
    Returns the delay used."""
    snapshot = store.parent / f"before-kill-{stage}"
    shutil.rmtree(snapshot, ignore_errors=True)
    if (store / stage).exists():
        shutil.copytree(store / stage, snapshot)
    for _ in range(attempts):
        started = time.time()
        proc = start()
        if kill_tree_when(proc, store, stage, delay, milestone):
            return delay
        if proc.returncode != 0 and not published_since(store, stage, started):
            output = log_path.read_text()
            raise AssertionError(commands.report(proc.args, proc.returncode, output, roots=[store / stage]))
        shutil.rmtree(store / stage, ignore_errors=True)
        if snapshot.exists():
            shutil.copytree(snapshot, store / stage)
        delay /= 2
    raise AssertionError(f"{stage} finished before every kill, the last {delay * 2:.3f} s into its build")


def compare_with_chain(stage: str, rebuilt: Path, reference: Path) -> dict:
    new, ref = (json.loads((p / "manifest.json").read_text()) for p in (rebuilt, reference))
    assert set(new["files"]) == set(ref["files"])
    timed = TIMED | TIMED_BY_STAGE.get(stage, set())
    differ = sorted(n for n in ref["files"] if n not in timed and new["files"][n]["sha256"] != ref["files"][n]["sha256"])
    if stage in TRAINED_FILES:
        # training is required to match within tolerance; the figures say whether it was exact
        name = TRAINED_FILES[stage]
        a, b = load_file(str(rebuilt / name)), load_file(str(reference / name))
        worst = max((a[k] - b[k]).abs().max().item() for k in b)
        assert worst <= 1e-4, f"{stage}: trained weights differ by up to {worst}"
        if stage not in TRAINING:  # a model's other files follow its weights; routers have none
            assert set(differ) <= {name}, f"{stage}: {differ} differ from the uninterrupted build"
        key = "valid_perplexity" if stage in TRAINING else "mean_router_coverage"
        assert new["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-3)
        return {"exact": not differ, "max_weight_difference": worst}
    assert differ == [], f"{stage}: {differ} differ from the uninterrupted build"
    assert untimed(new["metrics"]) == untimed(ref["metrics"])
    same = ("stage", "version", "params", "upstream", "code")
    assert {k: new[k] for k in same} == {k: ref[k] for k in same}
    return {"exact": True}


def untimed(obj):
    """Metrics without the wall-clock figures (throughputs, seconds, speed ratios)."""
    if isinstance(obj, dict):
        wall_clock = ("per_s", "seconds", "speed", "ratio_range", "unsteady")
        return {k: untimed(v) for k, v in obj.items() if not any(t in k for t in wall_clock)}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def kills(i: int, stage: str) -> list[tuple[str, int | None]]:
    """The crashes a stage goes through, one after the other (each rerun is killed again). A stage
    that saves progress: a random point just after its first checkpoint or shard, a random point
    of the resumed run, one step of publishing. Any other stage: a random point of its work and
    one step of publishing. The publishing steps are cycled over the stages."""
    publish = (PUBLISH_STEPS[i % len(PUBLISH_STEPS)], None)
    return [("random", 2 * i), ("random", 2 * i + 1), publish] if stage in MILESTONES else [("random", 2 * i), publish]


@pytest.mark.parametrize("i, stage", list(enumerate(STAGES)), ids=STAGES)
def test_killed_stage_reruns_to_the_uninterrupted_result(chain, tmp_path, i, stage):
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without=stage)
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    cmd = [sys.executable, "-m", "luigi", "--module", "tasks", stage, *TWO_RANKS]
    resumed_from = []
    for n, (kill, seed) in enumerate(kills(i, stage)):
        saved = resumable(store, stage)
        log_path = tmp_path / f"run{n}.log"

        def start(extra_env=None):
            with open(log_path, "w") as log:
                return subprocess.Popen(cmd, cwd=chain.root, env={**env, **(extra_env or {})}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

        if kill == "random":
            milestone = MILESTONES.get(stage) if n == 0 else None
            # after a milestone: within about one more checkpoint or shard; in a rerun, within what is left
            share = 0.1 if milestone else 0.9 if n == 0 else 0.5
            delay = random.Random(seed).uniform(0.0, share) * _chain_duration(chain, stage)
            kill_at_random(start, log_path, store, stage, delay, milestone)
        else:
            code = start({CRASH_ENV: kill}).wait(timeout=300)
            assert code == -signal.SIGKILL, f"the crash at {kill} did not happen (exit status {code})"
        deadline = time.time() + 5
        while survivors(store) and time.time() < deadline:
            time.sleep(0.1)
        assert survivors(store) == [], f"kill {n}: a process of the killed run is still running"
        assert_every_visible_version_is_valid(store)
        if n == 0 and stage in MILESTONES:
            assert resumable(store, stage), f"{stage}: nothing resumable was left by a kill after its first save"
        resumed_from.append((saved, log_path.read_text()))

    saved = resumable(store, stage)
    final = commands.run(cmd, roots=[store], cwd=chain.root, env=env)
    log = final.stdout + final.stderr
    resumed_from.append((saved, log))
    assert_every_visible_version_is_valid(store)
    [rebuilt] = [p for p in visible_versions(store) if p.parent.name == stage]
    reference = chain.artifacts / stage / rebuilt.name
    assert reference.is_dir(), f"the rerun built {stage} {rebuilt.name}, which the chain did not"
    assert not list((store / stage).glob(".scratch-*")), "no scratch directory is left"
    result = compare_with_chain(stage, rebuilt, reference)

    publish = kills(i, stage)[-1][0]
    if publish == "before-rename":
        assert "published it without rebuilding" in log, "a finished build was redone"
    if publish == "after-rename":
        assert "building in" not in log, "a published build was redone"
    for saved, run_log in resumed_from[1:]:  # every run that found saved progress, and got to train, used it
        trained = re.search(r"^(\[default0\]:)?step \d+ loss", run_log, re.M)  # torchrun's rank prefix
        if any(p.endswith("resume/checkpoint.json") for p in saved) and trained:
            assert "resuming from step" in run_log, "training restarted from zero despite a checkpoint"
    if any(Path(p).name.startswith("shard-") for p in resumed_from[-1][0]):  # left for the last run
        assert "complete shard(s) kept from an earlier run" in log, "the dump restarted from zero despite its shards"
    _record(stage, kills(i, stage), resumed_from, result)


def resumable(store: Path, stage: str) -> list[str]:
    """Saved progress in the stage's scratch directory: resume state and complete dump shards."""
    return sorted(p.relative_to(store).as_posix() for p in store.glob(f"{stage}/.scratch-*/**/*")
                  if p.is_file() and "ranks" not in p.parts  # torchrun's rank logs are no progress
                  and ("resume" in p.parts or (p.name.startswith("shard-") and p.suffix == ".h5")))


def _chain_duration(chain, stage) -> float:
    totals = [json.loads(m.read_text())["timings"]["total"] for m in (chain.artifacts / stage).glob("*/manifest.json")]
    return max(totals)


def _record(stage, kills, resumed_from, result) -> None:
    """One line per stage in a file named by CRASH_RECORD (for the closing note's counts; no
    assert reads it)."""
    path = os.environ.get("CRASH_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": stage, "kills": [k for k, _ in kills],
                                "saved_progress_before_each_rerun": [len(saved) for saved, _ in resumed_from],
                                **result}) + "\n")
