"""What checksum verification costs next to the work around it, measured side by side.

    python bench/verify_cost.py [--mib 1024]

Publishes a model-sized safetensors file through the store (write, then the publish-time sha256
and fsync), then opens it as a downstream stage does: the cached check (one stat per file),
a full rehash (`make verify`), and reading the weights into memory with safetensors (what the
stage then does, here from the page cache). Prints each step's seconds and its ratio to writing
the file.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pipeline.artifacts import StageSpec, Store, save_safetensors  # noqa: E402


def timed(fn, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="size of the weights file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d))
        spec = StageSpec("Bench", {}, {}, {})
        tensors = {f"w{i}": torch.randn(max(1, args.mib // 4), 2**18) for i in range(4)}  # rows of 1 MiB of fp32
        start = time.perf_counter()
        with store.publishing(spec) as build:
            save_safetensors(tensors, build.path / "model.safetensors")
            written = time.perf_counter() - start
        published = time.perf_counter() - start - written
        artifact = store.get("Bench", spec.version)
        size = artifact.manifest["files"]["model.safetensors"]["bytes"]
        load = timed(lambda: [t.sum() for t in load_file(str(artifact.path / "model.safetensors")).values()])
        cached = timed(lambda: store.verify(artifact))
        full = timed(lambda: store.verify(artifact, full=True))
    print(f"weights file: {size / 2**20:.0f} MiB; each step in seconds and relative to writing the file")
    for name, t in (("write it (save_safetensors)", written), ("publish: sha256 + fsync + manifest", published),
                    ("open downstream: cached check", cached), ("make verify: full rehash", full),
                    ("read the weights (page cache)", load)):
        print(f"  {name:<38} {t:9.5f} s  {t / written:8.5f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
