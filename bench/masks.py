"""2:4 mask functions (kernels.sparsity) at GPT-J size against the loop-by-loop references.

* ours: m4n2_1d, m4n2_2d_greedy, m4n2_2d_best on the whole weight, median of --runs calls;
* reference: the Python loops over groups / blocks of bench/masks_reference.py (the yardstick of
  tests/test_masks.py), timed once on the first --ref-rows rows and SCALED linearly by block count
  to the whole weight (running them on all of it would take minutes to hours). Their masks on
  that slice must equal ours, which the table says.

Also per method: the share of the total |w| that the mask keeps, and the short lines (block rows
plus block columns keeping fewer than 2; only greedy has any). ``--model DIR`` instead prints the
kept share of |w| per method for every pruned matrix of a model directory (e.g. the tiny ReLU
model) and whether best keeps at least as much as greedy on each.
"""
from __future__ import annotations

import argparse
import time

import torch

from kernels.sparsity import MASK_FUNCTIONS, short_lines
from masks_reference import REFERENCES
from timing import median_time

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=16384)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ref-rows", type=int, default=64, help="rows of the slice the references run on")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", help="a model directory: kept |w| per method on each of its pruned matrices")
    args = p.parse_args()
    if args.model:
        return model_masses(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    w = torch.randn(args.rows, args.cols, dtype=DTYPES[args.dtype], device=dev)
    ref_rows = min(args.ref_rows, args.rows)
    w_slice = w[:ref_rows].cpu()
    scale = args.rows / ref_rows
    mass = w.abs().sum(dtype=torch.float64)
    print(f"weight {args.rows} x {args.cols} {args.dtype}, device {dev}, threads {torch.get_num_threads()}; "
          f"ours: median of {args.runs} runs")
    print(f"reference: Python loops, timed once on {ref_rows} x {args.cols} and scaled x{scale:g} by block "
          f"count (SCALED, not run at full size)")
    print(f"{'method':<16}{'ours s':>9}{'ref s (scaled)':>16}{'speed-up':>10}{'same mask':>11}"
          f"{'kept |w|':>10}{'short lines':>13}")
    for name, fn in MASK_FUNCTIONS.items():
        ours = median_time(lambda: (fn(w), sync()), args.runs)
        mask = fn(w)
        start = time.perf_counter()
        ref_mask = REFERENCES[name](w_slice)
        ref = (time.perf_counter() - start) * scale
        same = torch.equal(fn(w_slice), torch.tensor(ref_mask, dtype=w.dtype))
        kept = float((w.abs() * mask).sum(dtype=torch.float64) / mass)
        short = "-" if name == "m4n2_1d" else f"{short_lines(mask):,}"
        print(f"{name:<16}{ours:>9.3f}{ref:>16.1f}{ref / ours:>9.0f}x{'yes' if same else 'NO':>11}"
              f"{kept:>10.4f}{short:>13}")
    blocks = args.rows * args.cols // 16
    print(f"kept |w|: share of sum |w| kept; short lines: out of {2 * 4 * blocks:,} block rows + columns "
          f"({blocks:,} 4x4 blocks)")


def model_masses(path: str) -> None:
    from pipeline.models import load_state_dict_from_dir
    from pipeline.prune import search_masks

    state = load_state_dict_from_dir(path)
    per_method = {name: search_masks(state, name)[1] for name in MASK_FUNCTIONS}
    print(f"{path}: share of |w| kept per matrix")
    print(f"{'matrix':<36}" + "".join(f"{n:>16}" for n in MASK_FUNCTIONS) + f"{'best >= greedy':>16}")
    for matrix in per_method["m4n2_1d"]:
        kept = [per_method[n][matrix]["mass_kept"] for n in MASK_FUNCTIONS]
        ok = per_method["m4n2_2d_best"][matrix]["mass_kept"] >= per_method["m4n2_2d_greedy"][matrix]["mass_kept"]
        print(f"{matrix:<36}" + "".join(f"{k:>16.4f}" for k in kept) + f"{'yes' if ok else 'NO':>16}")
    means = [sum(m["mass_kept"] for m in per_method[n].values()) / len(per_method[n]) for n in MASK_FUNCTIONS]
    print(f"{'mean':<36}" + "".join(f"{k:>16.4f}" for k in means))


if __name__ == "__main__":
    main()
