"""Two runs at once on one store: each version is built by one of them only, the other waits
for it and uses it, and both end with the same consistent store."""
import re
import subprocess
import sys
import textwrap
import time

import pytest

import commands
from conftest import ROOT
from pipeline.artifacts import AlreadyPublished, StageSpec, Store
from test_crash import assert_every_visible_version_is_valid, link_store

BUILT = re.compile(r"(\w+) ([0-9a-f]{16}): building in ")
WAITED = re.compile(r"(\w+) ([0-9a-f]{16}): another run \(pid \d+\) is building it; waiting for it to finish")


def test_make_moefy_twice_at_once(chain, tmp_path):
    store = tmp_path / "artifacts"
    link_store(chain.artifacts, store, without="HiddenStates")
    for stage in ("ExpertClusters", "Routers", "Moefied"):
        for version in (store / stage).iterdir():
            subprocess.run(["rm", "-rf", str(version)], check=True)
    env = {**chain.env, "PIPELINE_ARTIFACTS": str(store)}
    venv = sys.prefix
    cmd = ["make", "-o", f"{venv}/.installed", "moefy", "NPROC=2", f"VENV={venv}"]
    start = time.time()
    runs = [subprocess.Popen(cmd, cwd=chain.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    logs = [r.communicate(timeout=600)[0] for r in runs]
    for run, log in zip(runs, logs):
        if run.returncode != 0:
            raise AssertionError(commands.report(cmd, run.returncode, log, roots=[store], since=start))

    built = [set(BUILT.findall(log)) for log in logs]
    assert not built[0] & built[1], f"a version was built by both runs: {built[0] & built[1]}"
    rebuilt = built[0] | built[1]
    assert {stage for stage, _ in rebuilt} == {"HiddenStates", "ExpertClusters", "Routers", "Moefied"}
    assert any(WAITED.search(log) for log in logs), "the runs never met at a lock"
    for stage, version in rebuilt:
        assert (chain.artifacts / stage / version).is_dir(), f"{stage} {version} is what the chain built"
    assert_every_visible_version_is_valid(store)
    assert not list(store.glob("*/.scratch-*")) and not list(store.glob("*/.broken-*"))


def test_a_second_builder_waits_then_uses_the_first_ones_version(tmp_path):
    store = Store(tmp_path)
    spec = StageSpec("S", {"a": 1}, {}, {})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline.artifacts import StageSpec, Store
        with Store({str(tmp_path)!r}).publishing(StageSpec("S", {{"a": 1}}, {{}}, {{}})) as build:
            print("holding", flush=True)
            time.sleep(2)
            (build.path / "x.bin").write_bytes(b"first")
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    start = time.time()
    with pytest.raises(AlreadyPublished, match="published by another run meanwhile"):
        with store.publishing(spec):
            pytest.fail("the second builder must not build")
    assert time.time() - start > 1.0, "it waited for the first"
    assert holder.wait() == 0
    assert (store.get("S", spec.version).path / "x.bin").read_bytes() == b"first"
