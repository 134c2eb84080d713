"""Two pipeline builds sharing the machine: BaseModel (gpt-j-tiny, pretraining under torchrun)
built alone, then two different BaseModel builds at once in two stores, for each spin count of
the ranks' idle OpenMP threads ([pipeline] omp_spincount: OpenMP's default 300000, the
configured one, 0). Prints each build's training seconds per step and its slowdown against the
same setting alone and against OpenMP's default alone, side by side.

The Corpus is built once and copied into every store, so only training is timed (the manifests'
``train_wall_time_s``). Run it on an otherwise idle machine: it is the load it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPIN = 300000  # libgomp's GOMP_SPINCOUNT when OMP_WAIT_POLICY is unset


def configured_spin() -> int:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "luigi.cfg")
    return parser.getint("pipeline", "omp_spincount")


def luigi(store: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PIPELINE_ARTIFACTS": str(store)}
    env.pop("OMP_WAIT_POLICY", None)  # the pipeline's setting decides
    env.pop("GOMP_SPINCOUNT", None)
    return subprocess.Popen([sys.executable, "-m", "luigi", "--module", "tasks", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"a build failed:\n{out[-3000:]}")


def seconds_per_step(store: Path, steps: int) -> float:
    [manifest] = store.glob("BaseModel/*/manifest.json")
    return json.loads(manifest.read_text())["metrics"]["train_wall_time_s"] / steps


def builds(work: Path, corpus: Path, spin: int, seeds: list[int], steps: int) -> list[float]:
    """Seconds per step of one BaseModel build per seed, all started at once."""
    procs, stores = [], []
    for seed in seeds:
        store = work / f"{spin}-{len(seeds)}-{seed}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.copytree(corpus, store)
        stores.append(store)
        procs.append(luigi(store, "BaseModel", "--BaseModel-steps", str(steps), "--BaseModel-seed", str(seed),
                           "--BaseModel-save-interval", "0", "--BaseModel-eval-tokens", "4096",
                           "--pipeline-omp-spincount", str(spin)))
    for proc in procs:
        finish(proc)
    return [seconds_per_step(s, steps) for s in stores]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="training steps per build")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shared-machine-"))
    try:
        corpus = work / "corpus-store"
        finish(luigi(corpus, "Corpus"))
        print(f"{os.cpu_count()} cores; BaseModel gpt-j-tiny, {args.steps} steps per build")
        spins = sorted({DEFAULT_SPIN, configured_spin(), 0}, reverse=True)
        alone, rows = {}, []
        for spin in spins:
            [alone[spin]] = builds(work, corpus, spin, [11], args.steps)
            rows.append((spin, builds(work, corpus, spin, [12, 13], args.steps)))
        print(f"{'spin count':<10} {'alone s/step':>13} {'two at once s/step':>20} {'vs alone':>14} "
              f"{'vs default alone':>17}")
        for spin, together in rows:
            pair = " / ".join(f"{t:.3f}" for t in together)
            own = " / ".join(f"{t / alone[spin]:.2f}x" for t in together)
            base = " / ".join(f"{t / alone[DEFAULT_SPIN]:.2f}x" for t in together)
            print(f"{spin:<10} {alone[spin]:>13.3f} {pair:>20} {own:>14} {base:>17}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"(finished {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
