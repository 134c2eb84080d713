"""No-op rerun of the whole current graph (everything up to date), median of several runs.

By default builds the smoke graph in a temporary store first; ``--current`` times the real store
with the repository's luigi.cfg instead (build it first with ``make base``). Printed side by side
with the bare start-up cost of the interpreter plus Luigi, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = "AllStages"  # the whole current graph (tasks.TARGETS)


def timed(cmd, env, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return statistics.median(times), proc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--current", action="store_true", help="time the real store and luigi.cfg")
    args = p.parse_args()
    env = dict(os.environ)
    tmp = None
    if not args.current:
        tmp = tempfile.TemporaryDirectory()
        env.update(PIPELINE_ARTIFACTS=tmp.name, LUIGI_CONFIG_PATH=str(ROOT / "tests" / "smoke.cfg"))
        print("building the smoke graph in a temporary store ...", flush=True)
        subprocess.run([sys.executable, "-m", "luigi", "--module", "tasks", TARGET], cwd=ROOT, env=env,
                       check=True, capture_output=True)
    rerun, proc = timed([sys.executable, "-m", "luigi", "--module", "tasks", TARGET], env, args.runs)
    if "ran successfully" in proc.stdout + proc.stderr:
        sys.exit("the graph was not up to date: the timed run built something")
    status, _ = timed([sys.executable, "-m", "tasks.status"], env, args.runs)
    bare, _ = timed([sys.executable, "-c", "import luigi.cmdline"], env, args.runs)
    print(f"median of {args.runs} runs")
    print(f"  no-op rerun (luigi --module tasks {TARGET}): {rerun:6.2f} s")
    print(f"  python -m tasks.status                   : {status:6.2f} s")
    print(f"  bare interpreter + luigi import              : {bare:6.2f} s")
    print(f"  ratio no-op rerun / bare start-up            : {rerun / bare:6.1f}x")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
