"""What writing the hidden states to HDF5 adds to the forward passes, measured side by side in one run.

* forward: the windows through the model in batches, with write_shard's fc_in hooks capturing
  the inputs, nothing written;
* write_shard: pipeline.moefication.hidden.write_shard into a temporary directory.

Each is also split in-run: the time inside model(batch) (timed by hooks on the model) and the
rest (for write_shard: the fp16 conversion, the HDF5 writes, file set-up and the progress bar),
which does not drift with the machine's load between runs as the wall times do.

Target: HDF5 writing adds at most 10% to the forward passes. gpt-j-tiny shape, random init with
ReLU FFNs, random token windows; the runs interleaved, medians.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.models import GPTJ, get_preset
from pipeline.moefication.hidden import CHUNK_ROWS, write_shard


def forward(model, wins: np.ndarray, batch_size: int) -> None:
    captured: list[torch.Tensor] = []
    hooks = [b.mlp.fc_in.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
             for b in model.transformer.h]
    with torch.no_grad():
        for start in range(0, len(wins), batch_size):
            captured.clear()
            model(torch.from_numpy(wins[start:start + batch_size]))
    for h in hooks:
        h.remove()


class ModelClock:
    """Seconds spent inside ``model(...)`` since the last reset."""

    def __init__(self, model):
        self.inside, self._start = 0.0, 0.0
        model.register_forward_pre_hook(lambda m, a: setattr(self, "_start", time.perf_counter()))
        model.register_forward_hook(lambda m, a, o: self.add(time.perf_counter() - self._start))

    def add(self, seconds: float) -> None:
        self.inside += seconds


def interleaved(fns: dict, clock: ModelClock, runs: int) -> dict:
    """Per function, the medians of (wall s, s inside the model), after one warm-up call each,
    the runs interleaved."""
    times = {name: [] for name in fns}
    for r in range(runs + 1):
        for name, fn in fns.items():
            clock.inside = 0.0
            start = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - start, clock.inside))
    return {name: [statistics.median(col) for col in zip(*t)] for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-j-tiny")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = get_preset(args.model).replace(activation="relu")
    model = GPTJ(config).eval()
    clock = ModelClock(model)
    rng = np.random.default_rng(0)
    wins = rng.integers(0, config.vocab_size, (args.windows, args.seq_len))
    flags = np.arange(args.windows) >= args.windows * 0.9
    mb = wins.size * config.n_embd * config.n_layer * 2 / 2**20
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, contextlib.redirect_stderr(io.StringIO()):  # no tqdm bar
        shard = Path(tmp) / "shard-0.h5"
        bs = args.batch_size
        times = interleaved({"forward": lambda: forward(model, wins, bs),
                             "write_shard": lambda: write_shard(model, shard, wins, flags, bs, "bench")},
                            clock, args.runs)
    print(f"{args.model} (relu), {args.windows} windows x {args.seq_len} tokens, batch {args.batch_size}, "
          f"{config.n_layer} layers x {config.n_embd} dims: {mb:.1f} MiB fp16 in chunks of {CHUNK_ROWS} rows; "
          f"torch threads {torch.get_num_threads()}; median of {args.runs} interleaved runs")
    print(f"{'':<13}{'wall s':>9}{'in model s':>12}{'rest s':>9}{'rest/model':>12}")
    for name, (wall, inside) in times.items():
        print(f"{name:<13}{wall:>9.3f}{inside:>12.3f}{wall - inside:>9.3f}{(wall - inside) / inside * 100:>11.1f}%")
    (fwd, _), (wall, inside) = times["forward"], times["write_shard"]
    print(f"HDF5 writing overhead: {(wall / fwd - 1) * 100:+.1f}% wall (write_shard vs forward), "
          f"{(wall - inside) / inside * 100:+.1f}% in-run (target: at most +10%)")


if __name__ == "__main__":
    main()
