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


def only_version(store: Path, stage: str) -> Path:
    [version] = [p for p in (store / stage).iterdir() if not p.name.startswith(".")]
    return version


CASES = [
    # stage, damaged file, damage, the stage run afterwards (it is removed first unless it is the damaged one)
    ("Corpus", "train.npy", flip, "Corpus"),
    ("Corpus", "valid.npy", truncate, "Corpus"),
    ("ReluModel", "model.safetensors", truncate, "HiddenStates"),
    ("HiddenStates", "shard-0-0001.h5", flip, "Routers"),
    ("HiddenStates", "hidden_states.h5", truncate, "Routers"),
    ("Moefied", "report.md", flip, "Moefied"),
]


@pytest.mark.parametrize("stage, name, damage, run", CASES,
                         ids=[f"{s}-{n}-{d.__name__}" for s, n, d, _ in CASES])
def test_damaged_file_is_reported_then_rebuilt(chain, tmp_path, stage, name, damage, run):
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without=run if run != stage else "")
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    version = only_version(store, stage)
    reference = chain.artifacts / stage / version.name
    damage(version / name)

    status = subprocess.run([sys.executable, "-m", "pipeline.status", "--json", *TWO_RANKS], cwd=chain.root, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 1, "a broken artifact makes status exit 1"
    [entry] = [e for e in json.loads(status.stdout) if e["stage"] == stage]
    assert entry["state"] == "broken"
    assert str(version / name) in entry["reasons"][0] and "rerun the pipeline" in entry["reasons"][0]

    proc = subprocess.run([sys.executable, "-m", "luigi", "--module", "tasks", run, *TWO_RANKS], cwd=chain.root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: {stage}: {version / name}" in proc.stderr and "rebuilding" in proc.stderr
    [moved] = list((store / stage).glob(f".broken-{version.name}-*"))
    assert (moved / name).is_file(), "the broken version is kept aside for inspection"

    rebuilt = only_version(store, stage)
    assert rebuilt.name == version.name, "the rebuild is the same version"
    new, ref = (json.loads((p / "manifest.json").read_text())["files"] for p in (rebuilt, reference))
    assert {n: f["sha256"] for n, f in new.items() if n not in TIMED} == \
        {n: f["sha256"] for n, f in ref.items() if n not in TIMED}, "rebuilt byte for byte"
    status = subprocess.run([sys.executable, "-m", "pipeline.status", "--json", *TWO_RANKS], cwd=chain.root, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 0
    assert {e["state"] for e in json.loads(status.stdout) if e["stage"] == stage} == {"up-to-date"}
    if run != stage:
        built = only_version(store, run)
        assert (chain.artifacts / run / built.name).is_dir(), f"{run} was built on the rebuilt {stage} as in the chain"
    gc = subprocess.run([sys.executable, "-m", "pipeline.gc", *TWO_RANKS], cwd=chain.root, env=env,
                        capture_output=True, text=True)
    assert f"removing {moved}" in gc.stdout


def test_a_stage_refuses_an_input_damaged_after_scheduling(chain, tmp_path, monkeypatch):
    """Damage between Luigi's check and the stage's start: the stage stops before building,
    naming the file, and the broken version is moved aside for the next run to rebuild."""
    from luigi.cmdline_parser import CmdlineParser

    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without="HiddenStates")
    monkeypatch.setenv("PIPELINE_ARTIFACTS", str(store))
    monkeypatch.setenv("LUIGI_CONFIG_PATH", chain.env["LUIGI_CONFIG_PATH"])
    import tasks

    with CmdlineParser.global_instance(["HiddenStates", *TWO_RANKS]):
        task = tasks.HiddenStates()
        assert all(t.complete() for t in task.upstream().values())
        relu = only_version(store, "ReluModel")
        flip(relu / "model.safetensors")
        with pytest.raises(CorruptArtifact, match=f"input ReluModel: {relu / 'model.safetensors'} does not match"):
            task.run()
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
