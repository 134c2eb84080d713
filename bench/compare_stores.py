"""Compare the payloads of two artifact stores built from different code (before and after a
refactoring): every published artifact of A is matched with the one of B that has the same stage,
parameters and (recursively) upstream, and every payload file must be byte-identical, except the
files that hold wall-clock times (logs, the training log, the Report's speed table); trained
weights that differ are reported with their largest absolute difference.

    python bench/compare_stores.py STORE_A STORE_B [--ignore-param NAME ...]

``--ignore-param`` leaves a parameter out of the matching (one that B's code no longer puts in a
version where it cannot change the output).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TIMED = {"stage.log", "train.log", "dump.log", "train_log.json"}
UNTIMED_METRICS = ("perplexity", "loss", "kept", "coverage", "bytes", "zeros", "sparsity", "ratio")


def manifests(store: Path) -> dict[str, dict]:
    found = {}
    for path in store.glob("*/*/manifest.json"):
        if not path.parent.name.startswith("."):
            found[path.parent.name] = {**json.loads(path.read_text()), "path": path.parent}
    return found


def identity(version: str, by_version: dict[str, dict], ignore=frozenset()) -> str:
    """What a version is, independent of the code's hash: stage, parameters and upstream identities."""
    m = by_version[version]
    ups = {name: identity(v, by_version, ignore) if v in by_version else v for name, v in sorted(m["upstream"].items())}
    params = {k: v for k, v in m["params"].items() if k not in ignore}
    return json.dumps({"stage": m["stage"], "params": params, "upstream": ups}, sort_keys=True)


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        return float("inf")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) if ta[k].numel() else 0.0 for k in ta)


def compare(a: dict, b: dict) -> list[str]:
    problems = []
    files_a, files_b = a["files"], b["files"]
    if set(files_a) != set(files_b):
        problems.append(f"file lists differ: {sorted(set(files_a) ^ set(files_b))}")
    for name in sorted(set(files_a) & set(files_b)):
        if Path(name).name in TIMED or files_a[name]["sha256"] == files_b[name]["sha256"]:
            continue
        if name.endswith("report.md") and a["stage"] == "Report":
            continue  # its speed table is timed; its perplexities are compared through the metrics
        detail = ""
        if name.endswith(".safetensors"):
            detail = f" (largest weight difference {max_weight_difference(a['path'] / name, b['path'] / name):.3g})"
        problems.append(f"{name} differs{detail}")
    for key in sorted(set(a["metrics"]) | set(b["metrics"])):
        if any(word in key for word in UNTIMED_METRICS) and "per_s" not in key and "seconds" not in key:
            if a["metrics"].get(key) != b["metrics"].get(key) and "estimated" not in key:
                problems.append(f"metric {key}: {a['metrics'].get(key)} vs {b['metrics'].get(key)}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store_a", type=Path)
    p.add_argument("store_b", type=Path)
    p.add_argument("--ignore-param", action="append", default=[])
    args = p.parse_args(argv)
    ma, mb = manifests(args.store_a), manifests(args.store_b)
    ignore = frozenset(args.ignore_param)
    ids_b = {identity(v, mb, ignore): v for v in mb}
    failures = compared = files = 0
    for version in sorted(ma, key=lambda v: (ma[v]["stage"], v)):
        stage, other = ma[version]["stage"], ids_b.get(identity(version, ma, ignore))
        if other is None:
            print(f"{stage} {version}: no artifact with the same parameters and upstream in B")
            failures += 1
            continue
        problems = compare(ma[version], mb[other])
        compared += 1
        files += len(ma[version]["files"])
        print(f"{stage:<16} {version} vs {other}: {'identical payload' if not problems else '; '.join(problems)}")
        failures += bool(problems)
    print(f"{compared} artifacts ({files} files) compared, {failures} with differences")
    return 1 if failures or not compared else 0


if __name__ == "__main__":
    sys.exit(main())
