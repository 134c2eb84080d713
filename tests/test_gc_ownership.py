"""gc removes only what the store wrote, and keeps the resumable progress of the current graph
unless asked; ``make status`` says how far such a build got and where each artifact lies."""
import json

from test_bad_input import hf_checkpoint


def killed_build(store_root, stage: str, version: str, step: int):
    """What a training run killed after its checkpoint at ``step`` leaves: the store's scratch
    directory of ``version`` holding ``resume/checkpoint.json``."""
    from pipeline.artifacts import StageSpec, Store

    class Killed(Exception):
        pass

    class Pinned(StageSpec):  # a spec of the current graph's version
        @property
        def version(self):
            return version

    store = Store(store_root)
    try:
        with store.publishing(Pinned(stage, {}, {}, {})) as build:
            build.resume_dir.mkdir()
            (build.resume_dir / "checkpoint.json").write_text(json.dumps({"step": step, "dir": "step-x"}))
            raise Killed
    except Killed:
        pass
    return store.scratch_dir(stage, version)


def test_gc_leaves_user_files_and_the_current_graphs_resumable_work(project, tmp_path):
    p = project
    checkpoint = hf_checkpoint(tmp_path)
    inside = p.artifacts / "checkpoints" / "gptj"  # a user's checkpoint two levels down in the store
    inside.parent.mkdir(parents=True)
    checkpoint.rename(inside)
    graph = ("--pipeline-model", "gpt-j", "--pipeline-checkpoint", str(inside))
    built = p.luigi("BaseModel", *graph)
    again = p.luigi("BaseModel", *graph)  # nothing to build: it still says where the result is
    notes = p.artifacts / "BaseModel" / "notes.txt"
    notes.write_text("which run was the good one\n")
    lookalike = p.artifacts / "Corpus" / ".scratch-0123456789abcdef"  # no store marker: not the store's
    (lookalike / "resume").mkdir(parents=True)
    (lookalike / "resume" / "mine.txt").write_text("x")

    # a killed build of the current graph's ReluModel, and one of a version no graph holds
    relu = p.status(*graph)["ReluModel"]
    scratch = killed_build(p.artifacts, "ReluModel", relu["version"], 50)
    stale = killed_build(p.artifacts, "ReluModel", "fedcba9876543210", 20)
    assert scratch.is_dir() and stale.is_dir()

    status = p.status(*graph)
    assert status["ReluModel"]["state"] == "partial", status["ReluModel"]
    steps = status["ReluModel"]["params"]["steps"]
    assert status["ReluModel"]["reasons"][0].startswith(f"partial: resumable from step 50 of {steps}")
    base = p.artifacts / "BaseModel" / status["BaseModel"]["version"]
    for run in (built, again):  # a run ends by naming what it built
        assert run.stdout.rstrip().splitlines()[-1] == f"BaseModel is at {base}", run.stdout[-500:]
    assert status["BaseModel"]["path"] == str(base) and status["ReluModel"]["path"] == str(scratch)
    text = p.run("-m", "tasks.status", "--paths", *graph).stdout
    assert f"at {base}" in text and f"at {scratch}" in text, text

    out = p.run("-m", "tasks.gc", *graph).stdout
    for path in (p.artifacts / "checkpoints", notes, lookalike):
        assert out.count(f"leaving {path}:") == 1, out
    assert "gptj" not in out.replace(str(p.artifacts / "checkpoints"), ""), "the foreign tree is named once, whole"
    assert f"keeping {scratch}: resumable progress" in out, out
    assert f"removing {stale}" in out, out
    assert (inside / "config.json").is_file() and notes.is_file() and (lookalike / "resume" / "mine.txt").is_file()
    assert (scratch / "resume" / "checkpoint.json").is_file() and not stale.exists()

    out = p.run("-m", "tasks.gc", "--include-resumable", *graph).stdout
    assert f"removing {scratch}" in out and not scratch.exists(), out
    assert p.status(*graph)["ReluModel"]["state"] == "missing"
    assert (inside / "config.json").is_file() and notes.is_file() and lookalike.is_dir()


def test_a_published_version_whose_manifest_is_gone_is_still_the_stores(project):
    """The store's marker, not the manifest, says whose a directory is: a version whose manifest
    was deleted is the store's broken version, and gc removes it; a directory that merely has a
    version's name is not."""
    from pipeline.artifacts import StageSpec, Store, store_wrote

    store = Store(project.artifacts)
    specs = [StageSpec("Corpus", {"n": i}, {}, {}) for i in range(2)]
    for spec in specs:
        with store.publishing(spec) as build:
            (build.path / "x.txt").write_text("x")
    gone = store.version_dir("Corpus", specs[0].version)
    (gone / "manifest.json").unlink()
    fake = store.stage_dir("Corpus") / "0000000000000000"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"stage": "Corpus", "version": "0000000000000001"}))
    assert store_wrote(gone, "Corpus") and store_wrote(store.version_dir("Corpus", specs[1].version), "Corpus")
    assert not store_wrote(fake, "Corpus") and not store_wrote(gone, "BaseModel")
    out = project.run("-m", "tasks.gc", "--allow-last").stdout
    assert f"removing {gone}" in out and f"leaving {fake}:" in out, out
    assert not gone.exists() and fake.is_dir()
