"""``python -m tasks.gc [--dry-run] [luigi overrides]``: remove artifact versions (and
abandoned scratch directories) that the current graph no longer reaches, and the broken versions
that runs moved aside."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipeline.artifacts import BROKEN_PREFIX, Store
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.gc", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    args, specs = parse_graph_command(p, argv)
    store = Store()
    doomed = unreachable(store, {(s.stage, s.version) for s in specs})
    locks = [p for p in doomed if p.name.startswith(".lock-")]
    doomed = [p for p in doomed if p not in locks]
    if not args.dry_run:
        for lock in locks:
            lock.unlink()
    total = 0
    for path in doomed:
        size = size_of(path)
        total += size
        print(f"{'would remove' if args.dry_run else 'removing'} {path} ({size / 1e6:.1f} MB)")
        if not args.dry_run:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    verb = "would free" if args.dry_run else "freed"
    kept = sum(store.get(s.stage, s.version) is not None for s in specs)
    print(f"{len(doomed)} path(s), {verb} {total / 1e6:.1f} MB; kept {kept} current version(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
