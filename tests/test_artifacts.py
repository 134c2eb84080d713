"""The artifact store on its own: versions, code fingerprints, atomic publish, change reports."""
import json
import textwrap

import pytest

from pipeline import artifacts
from pipeline.artifacts import StageSpec, Store, StoreBusy, code_files, describe_changes, normalised_source_hash


def spec(**kw):
    base = dict(stage="S", params={"a": 1}, upstream={"U": "u1"}, code={"x.py": "h"})
    return StageSpec(**{**base, **kw})


def test_version_depends_on_every_input_and_nothing_else():
    v = spec().version
    assert spec().version == v
    assert spec(params={"a": 2}).version != v
    assert spec(upstream={"U": "u2"}).version != v
    assert spec(code={"x.py": "h2"}).version != v
    assert spec(stage="T").version != v
    assert spec(params={"a": 1}).version == StageSpec("S", {"a": 1}, {"U": "u1"}, {"x.py": "h"}).version


def test_source_hash_ignores_comments_whitespace_and_docstrings(tmp_path):
    a = tmp_path / "a.py"
    a.write_text('"""Doc."""\nx = 1\n\ndef f(y):\n    return y + x\n')
    h = normalised_source_hash(a)
    a.write_text('"""Other doc."""\n# a comment\nx  =  1\n\n\ndef f(y):  # inline\n    """More."""\n    return y + x\n')
    assert normalised_source_hash(a) == h
    a.write_text('x = 1\n\ndef f(y):\n    return y - x\n')
    assert normalised_source_hash(a) != h


def test_code_files_follow_project_imports_not_parent_packages():
    files = code_files(["tasks.base_model"], exclude=("tasks.corpus",))
    assert "tasks/base_model.py" in files and "tasks/stage.py" in files
    assert "pipeline/train.py" in files, "imports inside functions count"
    assert "pipeline/models/gptj.py" in files
    assert "tasks/corpus.py" not in files, "upstream stage modules are covered by upstream versions"
    assert "tasks/__init__.py" not in files, "the package gathering every stage is not a dependency"
    corpus = code_files(["tasks.corpus"])
    assert "pipeline/train.py" not in corpus and "tasks/base_model.py" not in corpus


def test_publish_is_atomic_and_records_checksums(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with store.publishing(s) as build:
        (build.path / "payload.bin").write_bytes(b"abc")
        build.metrics["n"] = 3
        assert store.get("S", s.version) is None, "nothing is visible before the manifest is written"
    art = store.get("S", s.version)
    m = art.manifest
    assert m["version"] == s.version and m["params"] == {"a": 1} and m["upstream"] == {"U": "u1"}
    assert m["metrics"] == {"n": 3}
    assert m["files"]["payload.bin"]["bytes"] == 3
    assert m["libraries"]["torch"] and "total" in m["timings"]
    assert not list((tmp_path / "S").glob(".scratch-*"))
    art.verify()
    (art.path / "payload.bin").write_bytes(b"abd")
    with pytest.raises(artifacts.CorruptArtifact, match="payload.bin does not match its recorded checksum"):
        art.verify()


def test_failed_build_leaves_nothing_unless_resumable(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with pytest.raises(RuntimeError):
        with store.publishing(s) as build:
            (build.path / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert store.get("S", s.version) is None
    assert not (tmp_path / "S" / f".scratch-{s.version}").exists()
    with pytest.raises(RuntimeError):
        with store.publishing(s) as build:
            build.resume_dir.mkdir()
            (build.resume_dir / "checkpoint.pt").write_bytes(b"state")
            raise RuntimeError("killed")
    assert (tmp_path / "S" / f".scratch-{s.version}" / "resume" / "checkpoint.pt").is_file()
    with store.publishing(s) as build:
        assert (build.resume_dir / "checkpoint.pt").read_bytes() == b"state", "a rerun resumes from the scratch"
        (build.path / "done.bin").write_bytes(b"y")
    published = store.get("S", s.version)
    assert set(published.manifest["files"]) == {"done.bin"}
    assert not (published.path / "resume").exists(), "resume state is not published"


def test_second_builder_of_the_same_version_is_refused(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with store.publishing(s):
        with pytest.raises(StoreBusy, match=r"another run \(pid \d+\) is building S version"):
            with store.publishing(s, wait=False):
                pass


def test_describe_changes_names_what_changed():
    old = {"version": "old", "params": {"a": 1, "gone": 5}, "upstream": {"U": "u0"},
           "code": {"files": {"x.py": "h0", "y.py": "h"}}}
    reasons = describe_changes(spec(), old)
    assert "parameter a changed from 1 to 1" not in reasons
    assert "parameter gone changed from 5 to '<unset>'" in reasons
    assert "source file x.py changed" in reasons
    assert "source file y.py is no longer used" in reasons
    assert "upstream U changed from u0 to u1" in reasons


def test_content_hash_is_cached_by_stamp(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "w.bin").write_bytes(b"1234")
    store = Store(tmp_path / "store")
    h = artifacts.content_hash(d, store)
    calls = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    assert artifacts.content_hash(d, store) == h and calls == [], "unchanged files are not reread"
    (d / "w.bin").write_bytes(b"12345")
    assert artifacts.content_hash(d, store) != h and calls
    cache = json.loads((store.root / ".cache" / "content-hashes.json").read_text())
    assert str(d.resolve()) in cache


def test_store_root_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ARTIFACTS", str(tmp_path / "elsewhere"))
    assert Store().root == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("PIPELINE_ARTIFACTS")
    assert Store().root == artifacts.PROJECT_ROOT / "artifacts"


def test_relative_imports_are_resolved(tmp_path, monkeypatch):
    pkg = tmp_path / "pipeline" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(textwrap.dedent("""
        from . import b
        from ..c import thing
    """))
    (pkg / "b.py").write_text("X = 1\n")
    (tmp_path / "pipeline" / "c.py").write_text("thing = 2\n")
    monkeypatch.setattr(artifacts, "PROJECT_ROOT", tmp_path)
    assert set(code_files(["pipeline.sub.a"])) == {"pipeline/sub/a.py", "pipeline/sub/b.py", "pipeline/c.py"}
