"""Sparse MoE FFN (router + top-k + sparse_ffn) against the dense FFN, side by side in one run.

GPT-J size by default: d_model 4096, d_ff 16384 as 512 experts of 32 neurons, top-20%. Weights
are random (scaled 1/sqrt(fan_in)); the dense FFN keeps nn.Linear's row-major ``w2``, the MoE
one the same values stored expert-major (see pipeline.moefication.sparse). Every call takes the
next of ``--layers`` weight sets and of 5 inputs, as a deep model would, so the weights come
from memory and not from a cache that held the previous call's (this CPU's L3 is 300 MiB).

Routing: "random" tokens are independent, so 16 of them choose nearly every expert between
them; "shared" tokens are one random vector plus 0.3x noise, like neighbouring tokens of one
sequence that mostly choose the same experts. "experts read" is the union of their choices.

Threads: on a machine shared with other jobs, every OpenMP parallel region can wait milliseconds
for a worker thread to get a core, which swamps an MoE that runs many small matmuls; there
``--threads 1`` measures the algorithms rather than the scheduler.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from pipeline.moefication.router import Router
from pipeline.moefication.sparse import sparse_ffn
from timing import median_time


def masked_dense(x, w1, b1, w2, b2, chosen, size):
    h = torch.relu(x @ w1.T + b1)
    mask = torch.zeros(len(x), w1.shape[0] // size).scatter_(1, chosen, 1.0)
    return (h * mask.repeat_interleave(size, dim=1)) @ w2.T + b2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=16384)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--fraction", type=float, default=0.2, help="share of the experts each token uses")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    p.add_argument("--layers", type=int, default=3, help="weight sets cycled through")
    p.add_argument("--runs", type=int, default=7, help="rounds, each timing dense and MoE 3 calls in turn")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, ff, num_expert = args.d_model, args.d_ff, args.experts
    size, topk = ff // num_expert, max(1, round(args.fraction * num_expert))
    layers = []
    for _ in range(args.layers):
        w2t = torch.randn(ff, d) / ff**0.5
        layers.append(dict(w1=torch.randn(ff, d) / d**0.5, b1=0.1 * torch.randn(ff), w2=w2t.T.contiguous(),
                           w2_expert_major=w2t.T, b2=0.1 * torch.randn(d), router=Router(d, num_expert)))
    step = [0]

    def next_call(xs):
        step[0] += 1
        return xs[step[0] % len(xs)], layers[step[0] % len(layers)]

    def dense(xs):
        x, l = next_call(xs)
        return torch.relu(x @ l["w1"].T + l["b1"]) @ l["w2"].T + l["b2"]

    def moe(xs):
        x, l = next_call(xs)
        chosen = l["router"](x).topk(topk, dim=-1).indices
        return sparse_ffn(x, l["w1"], l["b1"], l["w2_expert_major"], l["b2"], chosen, size)

    print(f"cpu, {torch.get_num_threads()} threads; d_model {d}, d_ff {ff}: {num_expert} experts of {size} "
          f"neurons, top-{topk} ({topk / num_expert:.0%}); {args.layers} layers cycled; median of "
          f"{args.runs} rounds of 3 calls; MoE = router + topk + sparse_ffn")
    print(f"{'tokens':>6}  {'routing':<8}{'experts read':>13}{'dense ms':>10}{'MoE ms':>9}{'speed-up':>10}"
          f"{'max|MoE - masked dense|':>25}")
    with torch.no_grad():
        for t in args.tokens:
            for routing in ("random", "shared") if t > 1 else ("random",):
                base = torch.randn(d)
                xs = [base + 0.3 * torch.randn(t, d) if routing == "shared" else torch.randn(t, d) for _ in range(5)]
                l = layers[0]
                chosen = [l["router"](x).topk(topk, dim=-1).indices for x in xs]
                read = sum(c.unique().numel() for c in chosen) / len(xs) / num_expert
                sparse = sparse_ffn(xs[0], l["w1"], l["b1"], l["w2_expert_major"], l["b2"], chosen[0], size)
                diff = (sparse - masked_dense(xs[0], l["w1"], l["b1"], l["w2"], l["b2"], chosen[0], size)).abs().max()
                rounds = [(median_time(lambda: dense(xs), 3), median_time(lambda: moe(xs), 3))
                          for _ in range(args.runs)]
                td, tm = (statistics.median(col) for col in zip(*rounds))
                print(f"{t:>6}  {routing:<8}{read:>12.0%}{td * 1e3:>10.2f}{tm * 1e3:>9.2f}{td / tm:>9.2f}x"
                      f"{diff.item():>25.1e}", flush=True)


if __name__ == "__main__":
    main()
