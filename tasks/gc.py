"""``python -m tasks.gc [--dry-run] [--only-current] [--allow-last] [--include-resumable] [luigi
overrides]``: remove the artifact versions nobody needs, saying why each one goes.

gc removes only what the store wrote: a version it published, a scratch directory it created, a
``.broken-`` copy it moved aside (each holding the store's marker, ``MARKER``), and their lock
files. Anything else in the store (a checkpoint, a notes file) is left and named once.

What stays, by default: every version the current graph reaches, and for every model and
checkpoint ever built, the newest version of each stage instance (a slot: the stage, the
parameters that tell its instances apart, such as FinalCompressed's toggles, and the slots of its
inputs, down to the model preset or checkpoint), with everything those versions were built
from. So switching ``MODEL=`` and running gc never removes another model's latest work.
``--only-current`` keeps the current graph alone. What goes: older versions of a slot,
unfinished builds that no live run holds (but those of the current graph that hold resumable
progress, unless ``--include-resumable``), broken versions that runs moved aside, and version
directories of the store whose manifest is gone. gc refuses to leave a stage without any published version
unless ``--allow-last`` is given."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
from pathlib import Path

from pipeline import cli
from pipeline.artifacts import BROKEN_PREFIX, LOCK_PREFIX, SCRATCH_PREFIX, Artifact, Store, store_wrote
from tasks.status import open_store, parse_graph_command, stage_classes



@dataclasses.dataclass
class Removal:
    stage: str
    version: str  # for a broken copy, its directory name
    paths: list[Path]
    reason: str


def slots(published: dict[str, Artifact]) -> dict[str, tuple]:
    """{version: slot} for every published version (see the module's docstring)."""
    classes = stage_classes()
    found: dict[str, tuple] = {}

    def slot(version: str) -> tuple:
        if version not in found:
            artifact = published.get(version)
            if artifact is None:  # an input removed already: the slot cannot be traced further
                return ("?", version)
            stage = artifact.manifest["stage"]
            cls = classes.get(stage)
            params = artifact.manifest["params"]
            own = tuple(sorted({**cls.instance(params), **cls.lineage(params)}.items())) if cls else ()
            inputs = tuple(sorted((name, slot(v)) for name, v in artifact.manifest.get("upstream", {}).items()))
            found[version] = (stage, own, inputs)
        return found[version]

    for version in published:
        slot(version)
    return found


def keep_set(published: dict[str, Artifact], newest: dict[str, str], current: set[str],
             only_current: bool) -> dict[str, str]:
    """{version kept: why}; a kept version keeps the versions it was built from."""
    keep = {v: "in the current graph" for v in current if v in published}
    if not only_current:
        for version in sorted(set(newest.values())):
            keep.setdefault(version, "the newest of its stage instance")
    todo = list(keep)
    while todo:
        for version in published[todo.pop()].manifest.get("upstream", {}).values():
            if version in published and version not in keep:
                keep[version] = "an input of a kept version"
                todo.append(version)
    return keep


def removals(store: Store, published: dict[str, Artifact], current: set[str], only_current: bool,
             include_resumable: bool = False) -> tuple[list[Removal], dict[str, str], list[Path]]:
    """What gc removes, grouped by version, each with its reason; what it keeps; and the paths in
    the store that the store did not write (left alone)."""
    newer = _newest_by_slot(published)
    keep = keep_set(published, newer, current, only_current)
    out: dict[tuple[str, str], Removal] = {}
    foreign: list[Path] = []
    for stage in store.stages():
        children = sorted(store.stage_dir(stage).iterdir())
        ours = [c for c in children if store_wrote(c, stage)]
        foreign += [c for c in children if c not in ours] if ours else [store.stage_dir(stage)]
        for child in ours:
            if child.name.startswith(BROKEN_PREFIX):
                out[stage, child.name] = Removal(stage, child.name, [child], "a broken version a run moved aside")
                continue
            version = child.name.removeprefix(SCRATCH_PREFIX).removeprefix(LOCK_PREFIX)
            if version in keep:
                continue
            if child.name.startswith(SCRATCH_PREFIX) and version in current and not include_resumable \
                    and store.partial(stage, version) is not None:
                keep[version] = f"resumable progress of the current graph's {stage} (--include-resumable removes it)"
                out.pop((stage, version), None)
                continue
            removal = out.setdefault((stage, version), Removal(stage, version, [], ""))
            removal.paths.append(child)
            if version in published:
                removal.reason = ("not in the current graph (--only-current)" if only_current else
                                  f"superseded by {newer[version]}, a newer build of the same stage instance")
            elif child.name.startswith(SCRATCH_PREFIX):
                removal.reason = "an unfinished build that no live run holds"
            elif not child.name.startswith(LOCK_PREFIX):
                removal.reason = "a version directory without a valid manifest (broken)"
            removal.reason = removal.reason or "the lock file of a finished build"
    return list(out.values()), keep, foreign


def _newest_by_slot(published: dict[str, Artifact]) -> dict[str, str]:
    """{version: the newest version of its slot}."""
    slot_of = slots(published)
    newest = {}
    for version, artifact in sorted(published.items(), key=lambda kv: kv[1].manifest.get("created", "")):
        newest[slot_of[version]] = version
    return {v: newest[slot_of[v]] for v in published}


def emptied(published: dict[str, Artifact], doomed: list[Removal]) -> list[str]:
    """The stages that would be left without any published version."""
    gone = {r.version for r in doomed}
    stages = {a.manifest["stage"] for a in published.values()}
    left = {a.manifest["stage"] for v, a in published.items() if v not in gone}
    return sorted(stages - left)


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove(store: Store, removal: Removal, dry_run: bool) -> tuple[int, int] | None:
    """Remove one version's paths: (paths, bytes freed), or None when a live run holds it."""
    lock = contextlib.nullcontext() if removal.version.startswith(BROKEN_PREFIX) else \
        store.unless_building(removal.stage, removal.version, create=not dry_run)
    with lock as builder:
        if builder is not None:  # a live run holds it (it may be resuming from its scratch)
            held = [str(p) for p in removal.paths if not p.name.startswith(LOCK_PREFIX)]
            print(f"skipping {', '.join(held)}: the run with pid {builder} is building {removal.stage} "
                  f"{removal.version}")
            return None
        count = total = 0
        for path in removal.paths:
            if path.name.startswith(LOCK_PREFIX):
                continue  # removed last, below
            size = size_of(path)
            count, total = count + 1, total + size
            print(f"{'would remove' if dry_run else 'removing'} {path} ({size / 1e6:.1f} MB): {removal.reason}")
            if not dry_run:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not dry_run and not removal.version.startswith(BROKEN_PREFIX):
            store.lock_path(removal.stage, removal.version).unlink(missing_ok=True)  # held until this block ends
    return count, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.gc", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and why, remove nothing")
    p.add_argument("--only-current", action="store_true",
                   help="keep only the current graph: remove every other model's and configuration's versions")
    p.add_argument("--allow-last", action="store_true", help="allow removing a stage's last published version")
    p.add_argument("--include-resumable", action="store_true",
                   help="also remove the progress of unfinished builds of the current graph (a rerun then starts them afresh)")
    args, specs = parse_graph_command(p, argv)
    store = open_store()
    published = {a.version: a for stage in store.stages() for a in store.versions(stage)}
    doomed, keep, foreign = removals(store, published, {s.version for s in specs}, args.only_current,
                                     args.include_resumable)
    if (empty := emptied(published, doomed)) and not args.allow_last:
        raise cli.UsageError(f"this would remove the last published version of {', '.join(empty)}; nothing was "
                             f"removed (pass --allow-last to remove them anyway)")
    for path in foreign:
        print(f"leaving {path}: the store did not write it (no store marker), so gc never removes it")
    for version, why in keep.items():
        if why.startswith("resumable"):
            stage = next(s.stage for s in specs if s.version == version)
            print(f"keeping {store.scratch_dir(stage, version)}: {why}")
    results = [remove(store, r, args.dry_run) for r in doomed]
    done = [r for r in results if r is not None]
    current = sum(why == "in the current graph" for why in keep.values())
    resumable = sum(why.startswith("resumable") for why in keep.values())
    skipped = len(results) - len(done)
    print(f"{sum(n for n, _ in done)} path(s), {'would free' if args.dry_run else 'freed'} "
          f"{sum(b for _, b in done) / 1e6:.1f} MB; kept {current} current version(s) and {len(keep) - current - resumable} "
          f"other(s) (the newest of every stage instance ever built, and their inputs)"
          f"{f', {resumable} unfinished build(s) holding resumable progress' if resumable else ''}"
          f"{f', and left {len(foreign)} path(s) the store did not write' if foreign else ''}"
          f"{f'; skipped {skipped} that a live run is building' if skipped else ''}")
    return 0


if __name__ == "__main__":
    cli.run(main)
