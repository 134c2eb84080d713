"""``python -m tasks.gc [--dry-run] [luigi overrides]``: remove artifact versions (and
abandoned scratch directories) that the current graph no longer reaches, and the broken versions
that runs moved aside."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

from pipeline.artifacts import BROKEN_PREFIX, MANIFEST, Store
from tasks.status import parse_graph_command


def unreachable(store: Store, keep: set[tuple[str, str]]) -> list[Path]:
    out = []
    for stage in store.stages():
        for child in sorted(store.stage_dir(stage).iterdir()):
            if child.name.startswith(BROKEN_PREFIX):
                out.append(child)
                continue
            version = child.name.removeprefix(".scratch-").removeprefix(".lock-")
            if child.name.startswith(".") and version == child.name:
                continue  # not ours
            if (stage, version) not in keep:
                out.append(child)
    return out


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def by_version(doomed: list[Path]) -> dict[tuple[str, str], list[Path]]:
    """The paths to remove grouped by (stage, version); a broken copy moved aside is its own group."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for path in doomed:
        version = path.name if path.name.startswith(BROKEN_PREFIX) else \
            path.name.removeprefix(".scratch-").removeprefix(".lock-")
        groups.setdefault((path.parent.name, version), []).append(path)
    return groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.gc", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args, specs = parse_graph_command(p, argv)
    store = Store()
    total = removed = skipped = 0
    for (stage, version), paths in by_version(unreachable(store, {(s.stage, s.version) for s in specs})).items():
        lock = contextlib.nullcontext() if version.startswith(BROKEN_PREFIX) else \
            store.unless_building(stage, version, create=not args.dry_run)
        with lock as builder:
            if builder is not None:  # a live run holds it (it may be resuming from its scratch)
                held = [str(p) for p in paths if not p.name.startswith(".lock-")]
                print(f"skipping {', '.join(held)}: the run with pid {builder} is building {stage} {version}")
                skipped += 1
                continue
            for path in paths:
                if path.name.startswith(".lock-"):
                    continue  # removed last, below
                size = size_of(path)
                total, removed = total + size, removed + 1
                print(f"{'would remove' if args.dry_run else 'removing'} {path} ({size / 1e6:.1f} MB)")
                if not args.dry_run:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            if not args.dry_run and not version.startswith(BROKEN_PREFIX):
                store.lock_path(stage, version).unlink(missing_ok=True)  # held until the end of this block
    verb = "would free" if args.dry_run else "freed"
    kept = sum(store.version_dir(s.stage, s.version).joinpath(MANIFEST).is_file() for s in specs)
    print(f"{removed} path(s), {verb} {total / 1e6:.1f} MB; kept {kept} current version(s)"
          f"{f'; skipped {skipped} that a live run is building' if skipped else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
