"""Corruption is detected: a truncated or altered payload file (safetensors, HDF5, token array)
is caught by its recorded checksum, `make status` shows the version as broken and names the file,
and the next run moves it aside and rebuilds it, byte for byte, without touching the rest."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import commands
from conftest import TWO_RANKS
from pipeline import artifacts
from pipeline.artifacts import CorruptArtifact, StageSpec, Store
from test_crash import TIMED, link_store


def own_copy(path: Path) -> None:
    """Give a hard-linked file its own inode before damaging it (the chain's store shares it)."""
    tmp = path.with_name(path.name + ".own")
    shutil.copyfile(path, tmp)
    os.replace(tmp, path)


def flip(path: Path) -> None:
    own_copy(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    own_copy(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 7)


def remove(path: Path) -> None:
    path.unlink()  # the chain's file keeps its other link


def only_version(store: Path, stage: str) -> Path:
    """The stage's published version (the first, for a stage with several instances)."""
    return sorted(p for p in (store / stage).iterdir() if not p.name.startswith("."))[0]


SCENARIOS = {
    # damaged files (stage, file, damage), a stage removed first (so that the run must read its
    # inputs), and the stage run
    "through-Moefied": ([("Corpus", "train.npy", flip), ("HiddenStates", "shard-0-0001.h5", flip),
                         ("Routers", "routers.safetensors", truncate), ("Moefied", "report.md", truncate)],
                        None, "Moefied"),
    # a version directory whose manifest was deleted: broken, moved aside and rebuilt like any other
    "manifest-removed": ([("HiddenStates", "manifest.json", remove)], None, "HiddenStates"),
    # a broken input behind a complete target: the run verifies the whole graph and repairs it
    "behind-a-complete-target": ([("Corpus", "train.npy", flip)], None, "Moefied"),
}


def status(chain, env) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "tasks.status", "--json", *TWO_RANKS], cwd=chain.root, env=env,
                          capture_output=True, text=True)
    entries = {}
    for e in json.loads(proc.stdout):
        entries.setdefault(e["stage"], []).append(e)
    return proc.returncode, entries


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_damaged_files_are_reported_then_rebuilt(chain, tmp_path, scenario):
    damages, removed, run = SCENARIOS[scenario]
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without=removed or "")
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    versions = {}
    for stage, name, damage in damages:
        versions[stage] = only_version(store, stage)
        damage(versions[stage] / name)

    code, entries = status(chain, env)
    assert code == 1, "a broken artifact makes status exit 1"
    for stage, name, _ in damages:
        [entry] = [e for e in entries[stage] if e["version"] == versions[stage].name]
        assert entry["state"] == "broken"
        assert str(versions[stage] / name) in entry["reasons"][0] and "rerun the pipeline" in entry["reasons"][0]

    proc = commands.run([sys.executable, "-m", "luigi", "--module", "tasks", run, *TWO_RANKS], roots=[store],
                        cwd=chain.root, env=env)
    for stage, name, damage in damages:
        version = versions[stage]
        assert f"warning: {stage}: {version / name}" in proc.stderr
        [moved] = list((store / stage).glob(f".broken-{version.name}-*"))
        assert moved.is_dir() and ((moved / name).is_file() or damage is remove), "the broken version is kept aside"
        rebuilt = store / stage / version.name
        assert rebuilt.is_dir(), "the rebuild is the same version"
        new, ref = (json.loads((p / "manifest.json").read_text())["files"]
                    for p in (rebuilt, chain.artifacts / stage / version.name))
        assert {n: f["sha256"] for n, f in new.items() if n not in TIMED} == \
            {n: f["sha256"] for n, f in ref.items() if n not in TIMED}, f"{stage} rebuilt byte for byte"

    if run not in {stage for stage, _, _ in damages}:
        target = only_version(store, run)
        assert f"{run} {target.name}: already published" in proc.stderr, "the complete target is not rebuilt"
        assert not list((store / run).glob(".broken-*"))
    code, entries = status(chain, env)
    assert code == 0
    for stage in {stage for stage, _, _ in damages} | {run}:
        assert {e["state"] for e in entries[stage]} == {"up-to-date"}, stage
    gc = subprocess.run([sys.executable, "-m", "tasks.gc", *TWO_RANKS], cwd=chain.root, env=env,
                        capture_output=True, text=True)
    assert gc.stdout.count(".broken-") == len(damages) and not list(store.glob("*/.broken-*"))


def test_a_stage_refuses_an_input_damaged_after_scheduling(chain, tmp_path):
    """Damage between Luigi's check and the stage's start: the stage stops before building,
    naming the file, and the broken version is moved aside for the next run to rebuild."""
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without="HiddenStates")
    relu = only_version(store, "ReluModel")
    script = f"""
import sys
from luigi.cmdline_parser import CmdlineParser
import tasks
from test_corruption import flip
with CmdlineParser.global_instance(["HiddenStates", *{list(TWO_RANKS)!r}]):
    task = tasks.HiddenStates()
    assert all(t.complete() for t in task.upstream().values())
    flip(__import__("pathlib").Path({str(relu / "model.safetensors")!r}))
    try:
        task.run()
    except Exception as e:
        print(type(e).__name__, e)
"""
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store),
           "PYTHONPATH": f"{chain.root}{os.pathsep}{Path(__file__).parent}"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=chain.root, env=env, capture_output=True, text=True)
    assert f"CorruptArtifact input ReluModel: {relu / 'model.safetensors'} does not match" in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]
    assert not relu.exists() and list((store / "ReluModel").glob(".broken-*"))
    assert not list((store / "HiddenStates").glob("*")), "nothing of HiddenStates was started"


def test_unchanged_files_are_not_rehashed_and_any_write_is(tmp_path, monkeypatch):
    store = Store(tmp_path)
    spec = StageSpec("S", {}, {}, {})
    with store.publishing(spec) as build:
        (build.path / "a.bin").write_bytes(b"x" * 1000)
        (build.path / "b.bin").write_bytes(b"y" * 1000)
    artifact = store.get("S", spec.version)
    hashed = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    store.verify(artifact)
    assert hashed == [], "publishing recorded both files as verified"
    path = artifact.path / "a.bin"
    st = path.stat()
    with open(path, "r+b") as f:  # same size, times set back: only the ctime tells
        f.write(b"z")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptArtifact, match="a.bin does not match its recorded checksum"):
        store.verify(artifact)
    assert hashed == ["a.bin"]
    hashed.clear()
    path.write_bytes(b"x" * 1000)  # restored: verifies again, and b.bin is still not reread
    store.verify(artifact)
    assert hashed == ["a.bin"]
    hashed.clear()
    store.verify(artifact, full=True)
    assert sorted(hashed) == ["a.bin", "b.bin"], "--verify rereads everything"
