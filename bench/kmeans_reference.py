"""Parameter clustering against the references, measured side by side in one run.

* ours: ``pipeline.moefication.balanced_kmeans`` (balanced spherical k-means with pairwise swaps
  after each assignment, torch) with its default seedings (``seedings``: four below a size, one
  above), with four, from one, and from one without the swaps;
* ``k-means-constrained`` (the library MoEfication's ``ParamSplit`` calls; a bench dependency:
  ``pip install k-means-constrained``) on the L2-normalised rows, with its defaults (10 inits)
  unless ``--kmc-init`` / ``--kmc-max-iter`` say otherwise;
* same-size k-means with swaps (ELKI's algorithm, which BMCook's ``EqualGroupsKMeans`` ports),
  written here in numpy: each row, most eager first, moves to a preferred centre by swapping with
  a row queued to leave that centre for its own; the two means move with each swap;
* floor: ``random_split``.

Rows: every layer's ``fc_in`` of a model directory (``--model``, e.g. the ReluModel artifact of
gpt-j-tiny), or a seeded synthetic GPT-J-size layer (one random direction per expert, unequal
cluster sizes, noise from light to heavy). Prints, per layer, the mean cosine of the rows to
their expert centroid and the wall time of each method.

    python bench/kmeans_reference.py --model artifacts/ReluModel/<version> --experts 32
    python bench/kmeans_reference.py --rows 16384 --dim 4096 --experts 512 --no-kmc --no-elki
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus
from sklearn.preprocessing import normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.moefication import balanced_kmeans, cosine_to_centroid, random_split  # noqa: E402
from pipeline.moefication.clustering import RESTARTS  # noqa: E402


def synthetic_rows(rows: int, dim: int, experts: int, seed: int) -> np.ndarray:
    """rows = direction of a random cluster + Gaussian noise of norm sigma ~ U(0.5, 2.5)
    (cosine to its direction about 0.9 down to 0.37), times a random row scale."""
    rng = np.random.default_rng(seed)
    dirs = normalize(rng.standard_normal((experts, dim), dtype=np.float32))
    cluster = rng.choice(experts, rows, p=rng.dirichlet(np.full(experts, 2.0)))
    sigma = rng.uniform(0.5, 2.5, (rows, 1)).astype(np.float32)
    x = dirs[cluster] + sigma * rng.standard_normal((rows, dim), dtype=np.float32) / np.sqrt(dim)
    return x * rng.uniform(0.5, 2.0, (rows, 1)).astype(np.float32)


def same_size_kmeans(rows: np.ndarray, k: int, seed: int = 0, max_iter: int = 50) -> np.ndarray:
    """ELKI's same-size k-means on the normalised rows (squared Euclidean distances to the means)."""
    x = normalize(rows).astype(np.float64)
    size = len(x) // k
    means, _ = kmeans_plusplus(x, k, random_state=seed)

    def distances() -> np.ndarray:
        return (x * x).sum(1)[:, None] - 2 * x @ means.T + (means * means).sum(1)[None, :]

    d = distances()
    # initial assignment: rows whose best centre is most clearly best go first, to the nearest with room
    labels, room = np.full(len(x), -1), np.full(k, size)
    for i in np.argsort(d.min(1) - d.max(1), kind="stable"):
        for c in np.argsort(d[i], kind="stable"):
            if room[c]:
                labels[i], room[c] = c, room[c] - 1
                break
    for _ in range(max_iter):
        means = np.stack([x[labels == c].mean(0) for c in range(k)])
        d = distances()
        own = d[np.arange(len(x)), labels]  # the order of this pass; the gains read d as it moves
        queued: list[list[int]] = [[] for _ in range(k)]  # rows waiting to leave each centre
        swaps = 0
        for i in np.argsort(d.min(1) - own, kind="stable"):  # most eager to move first
            a, moved = labels[i], False
            for b in np.argsort(d[i], kind="stable"):
                if d[i, b] >= d[i, a]:
                    break
                # a row queued to leave b whose move to a, with i's to b, lowers the total distance
                gains = [(d[j, b] - d[j, a]) + (d[i, a] - d[i, b]) for j in queued[b]]
                if gains and max(gains) > 1e-12:
                    j = queued[b].pop(int(np.argmax(gains)))
                    labels[i], labels[j], moved = b, a, True
                    swaps += 1
                    # the two means move at once, as ELKI's do
                    means[a] += (x[j] - x[i]) / size
                    means[b] += (x[i] - x[j]) / size
                    for c in (a, b):
                        d[:, c] = (x * x).sum(1) - 2 * x @ means[c] + means[c] @ means[c]
                    break
            if not moved and d[i].min() < d[i, a]:
                queued[a].append(i)
        if swaps == 0:
            break
    return labels


def kmeans_constrained(rows: np.ndarray, k: int, seed: int, n_init: int, max_iter: int) -> np.ndarray:
    try:
        from k_means_constrained import KMeansConstrained
    except ImportError:
        sys.exit("k-means-constrained is a bench dependency: .venv/bin/pip install -e '.[bench]' (or pass --no-kmc)")

    size = len(rows) // k
    return KMeansConstrained(n_clusters=k, size_min=size, size_max=size, random_state=seed, n_init=n_init,
                             max_iter=max_iter).fit(normalize(rows)).labels_


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def layers(args) -> list[tuple[str, np.ndarray]]:
    if args.model is None:
        return [(f"synthetic {args.rows}x{args.dim}", synthetic_rows(args.rows, args.dim, args.experts, args.seed))]
    from pipeline.models import checkpoint_config
    from pipeline.moefication.param_cluster import FcIn

    fc_in = FcIn.from_dir(args.model, num_layer=checkpoint_config(args.model).n_layer)
    return [(f"layer {i}", fc_in[i].numpy()) for i in range(len(fc_in))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a model directory: cluster every layer's fc_in rows")
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--experts", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmc-init", type=int, default=10, help="k-means-constrained's n_init (its default: 10)")
    p.add_argument("--kmc-max-iter", type=int, default=300, help="k-means-constrained's max_iter (its default: 300)")
    p.add_argument("--no-elki", action="store_true", help="leave out the same-size k-means reference (slow in Python)")
    p.add_argument("--no-kmc", action="store_true", help="leave out k-means-constrained (min-cost flow: slow at GPT-J size)")
    args = p.parse_args()
    methods = {
        "ours": lambda x: balanced_kmeans(x, args.experts, seed=args.seed),
        f"ours, {RESTARTS} seedings": lambda x: balanced_kmeans(x, args.experts, seed=args.seed, restarts=RESTARTS),
        "ours, one seeding": lambda x: balanced_kmeans(x, args.experts, seed=args.seed, restarts=1),
        "ours, no swaps": lambda x: balanced_kmeans(x, args.experts, seed=args.seed, swap_rounds=0, restarts=1),
        **({} if args.no_kmc else {"k-means-constrained": lambda x: kmeans_constrained(
            x, args.experts, args.seed, args.kmc_init, args.kmc_max_iter)}),
        **({} if args.no_elki else {"same-size k-means": lambda x: same_size_kmeans(x, args.experts, args.seed)}),
        "random split": lambda x: random_split(len(x), args.experts, seed=args.seed),
    }
    print(f"{args.experts} experts; torch threads {torch.get_num_threads()}; k-means-constrained n_init "
          f"{args.kmc_init}, max_iter {args.kmc_max_iter}; mean cosine to centroid (wall s)")
    print(f"{'rows':<24}" + "".join(f"{name:>24}" for name in methods))
    worst = {name: np.inf for name in methods}
    for label, rows in layers(args):
        size = len(rows) // args.experts
        line = f"{label:<24}"
        cos = {}
        for name, method in methods.items():
            labels, seconds = timed(lambda: method(rows))
            assert (np.bincount(labels, minlength=args.experts) == size).all(), f"{name}: unequal experts"
            cos[name] = cosine_to_centroid(rows, labels)
            line += f"{cos[name]:>16.4f} ({seconds:5.1f})"
        for name in methods:
            worst[name] = min(worst[name], cos["ours"] - cos[name])
        print(line, flush=True)
    print("ours minus each, on its worst layer: " + ", ".join(f"{n} {v:+.4f}" for n, v in worst.items() if n != "ours"))


if __name__ == "__main__":
    main()
