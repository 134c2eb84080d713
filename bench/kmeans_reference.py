"""Parameter clustering against the MoEfication reference, measured side by side in one run.

* ours: pipeline.moefication.balanced_kmeans (balanced spherical k-means, torch);
* reference, done the MoEfication way: sklearn KMeans on the L2-normalised rows, then one
  equal-size assignment to its centres, greedy: neurons in descending order of their best cosine,
  each to its most similar centre that still has room;
* floor: random_split.

Target: a GPT-J layer (16384 neurons x 4096 dims into 512 experts) in at most 60 s on 2 CPU cores,
with a mean cosine-to-centroid at least the reference's. No real fc_in here, so the rows are a
seeded mixture: one random direction per expert, unequal cluster sizes (Dirichlet), and per-row
noise from light to heavy, so the equal-size constraint and the noise both bite.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.preprocessing import normalize

from pipeline.moefication import balanced_kmeans, cosine_to_centroid, random_split


def synthetic_rows(rows: int, dim: int, experts: int, seed: int) -> np.ndarray:
    """rows = direction of a random cluster + Gaussian noise of norm sigma ~ U(0.5, 2.5)
    (cosine to its direction about 0.9 down to 0.37), times a random row scale."""
    rng = np.random.default_rng(seed)
    dirs = normalize(rng.standard_normal((experts, dim), dtype=np.float32))
    cluster = rng.choice(experts, rows, p=rng.dirichlet(np.full(experts, 2.0)))
    sigma = rng.uniform(0.5, 2.5, (rows, 1)).astype(np.float32)
    x = dirs[cluster] + sigma * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
    return x * rng.uniform(0.5, 2.0, (rows, 1)).astype(np.float32)


def equal_size_assign(sims: np.ndarray, size: int) -> np.ndarray:
    """Greedy: neurons by descending best similarity, each to its best centre with room."""
    room = np.full(sims.shape[1], size)
    labels = np.empty(len(sims), dtype=np.int64)
    prefs = np.argsort(-sims, axis=1)
    for i in np.argsort(-sims.max(axis=1), kind="stable"):
        for c in prefs[i]:
            if room[c]:
                room[c] -= 1
                labels[i] = c
                break
    return labels


def reference(rows: np.ndarray, experts: int, seed: int, max_iter: int) -> tuple[np.ndarray, int]:
    x = normalize(rows)
    km = KMeans(n_clusters=experts, n_init=1, random_state=seed, max_iter=max_iter).fit(x)
    return equal_size_assign(x @ km.cluster_centers_.T, len(x) // experts), km.n_iter_


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-iter", type=int, default=300, help="sklearn KMeans max_iter (its default: 300)")
    args = p.parse_args()
    rows = synthetic_rows(args.rows, args.dim, args.experts, args.seed)
    size = args.rows // args.experts
    print(f"{args.rows} rows x {args.dim} dims into {args.experts} experts of {size}; "
          f"torch threads {torch.get_num_threads()}; one run each")
    ours, t_ours = timed(lambda: balanced_kmeans(rows, args.experts, seed=args.seed))
    (ref, n_iter), t_ref = timed(lambda: reference(rows, args.experts, args.seed, args.max_iter))
    floor = random_split(args.rows, args.experts, seed=args.seed)
    print(f"{'method':<40}{'wall s':>9}{'cosine':>9}{'equal':>7}")
    results = [("ours: balanced_kmeans", t_ours, ours),
               (f"reference: KMeans ({n_iter}/{args.max_iter} it) + equal", t_ref, ref),
               ("floor: random_split", None, floor)]
    cos = {}
    for name, t, labels in results:
        cos[name] = cosine_to_centroid(rows, labels)
        equal = bool((np.bincount(labels, minlength=args.experts) == size).all())
        print(f"{name:<40}{'' if t is None else f'{t:.2f}':>9}{cos[name]:>9.4f}{'yes' if equal else 'NO':>7}")
    c_ours, c_ref = cos[results[0][0]], cos[results[1][0]]
    print(f"ours/reference time {t_ours / t_ref:.2f}x, ours - reference cosine {c_ours - c_ref:+.4f}")
    if n_iter >= args.max_iter:
        print(f"note: sklearn KMeans stopped at max_iter={args.max_iter} before converging")


if __name__ == "__main__":
    main()
