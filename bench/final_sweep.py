"""What moves the combined model's perplexity: FinalCompressed at several step counts and
distillation mixes, each a real stage run (published like any other, so reruns reuse them).

    python bench/final_sweep.py --steps 150 300 600 --mix kd_mse_last_hidden=1

Runs ``luigi --module tasks FinalCompressed`` with ``--FinalCompressed-steps N`` for every N (and
the configured mix), then once per ``--mix`` setting at the configured steps, and prints, per run,
the perplexity against the teacher as trained and as deployed (the int8 compressed model), and the
fidelity to the teacher as trained (KL, top-1 agreement, greedy agreement out of 32).
Any further arguments go to luigi (e.g. ``--FinalCompressed-moe false``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys

from luigi.cmdline_parser import CmdlineParser

import tasks
from pipeline.artifacts import Store


def run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "luigi", "--module", "tasks", "FinalCompressed", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with CmdlineParser.global_instance(["FinalCompressed", *args]):  # the version luigi built
        version = tasks.FinalCompressed().version
    return Store().get("FinalCompressed", version).metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="*", default=[150, 300, 600])
    p.add_argument("--mix", nargs="*", default=[], help="NAME=VALUE settings of [FinalCompressed], one run each")
    args, extra = p.parse_known_args()
    runs = [(f"steps {n}", ["--FinalCompressed-steps", str(n)]) for n in args.steps]
    for setting in args.mix:
        name, _, value = setting.partition("=")
        runs.append((setting, [f"--FinalCompressed-{name.replace('_', '-')}", value]))
    print(f"{'run':28s} {'as trained':>11s} {'deployed':>9s} {'KL':>7s} {'top-1':>6s} {'greedy':>6s}   "
          f"(perplexity / teacher's)")
    for label, flags in runs:
        m = run([*flags, *extra])
        deployed = m.get("compressed_perplexity_ratio")
        print(f"{label:28s} {m['perplexity_ratio']:10.4f}x {'-' if deployed is None else f'{deployed:.4f}x':>9}"
              f" {m['kl']:7.4f} {m['top1_agreement']:6.3f} {m['greedy_agreement']:6.1f}   {m['variant']}", flush=True)


if __name__ == "__main__":
    main()
