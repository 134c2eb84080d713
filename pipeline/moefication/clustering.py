"""Parameter clustering: the neurons of one FFN (rows of ``fc_in``) into equal-size experts.

Balanced spherical k-means: rows are L2-normalised (neurons whose input weights point the same
way fire together), centroids are the normalised means of their experts, and the assignment
step gives every expert exactly ``rows / num_expert`` neurons.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.moefication.experts import check_experts



RESTARTS, SCREEN = 4, 15  # balanced_kmeans' seedings, and the iterations each runs before the best goes on
# ... up to this many multiply-adds per iteration (rows x dims x experts); one seeding above it
# (a GPT-J layer, 16384 x 4096 into 512, is 8x this; the README has what four seedings gain there)
SCREEN_WORK = 2**32
# k-means++ draws its centroids one at a time, each after a pass over every row: above this many
# rows (or 8 per expert) it seeds from a random sample of that size (a GPT-J layer: 4096 of 16384)
SEED_POOL = 4096


def balanced_assign(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Labels (n,) giving each of the k columns exactly ``size`` rows, greedily by score: every
    unassigned row proposes to its best expert that still has room; an expert takes its best
    proposals up to its room; repeat. Ties go to the lower index (deterministic)."""
    n, k = scores.shape
    on = scores.device
    labels = torch.full((n,), -1, dtype=torch.long, device=on)
    room = torch.full((k,), size, dtype=torch.long, device=on)
    scores = scores.clone()
    while (unassigned := (labels < 0).nonzero().squeeze(1)).numel():
        best, choice = scores[unassigned].max(dim=1)
        # sort proposals by expert, then by score (best first), stable for ties
        order = torch.argsort(-best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        chosen = choice[order]
        first = torch.searchsorted(chosen, torch.arange(k, device=on))
        rank = torch.arange(len(order), device=on) - first[chosen]
        accept = rank < room[chosen]
        labels[unassigned[order[accept]]] = chosen[accept]
        room -= torch.bincount(chosen[accept], minlength=k)
        scores[:, room == 0] = float("-inf")
    return labels


def _centroids(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    return F.normalize(sums, dim=1)


def _init_centroids(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the sphere: each next centroid drawn with probability proportional to
    the squared distance (2 - 2 cos) to the nearest one chosen so far; from a random sample of
    ``SEED_POOL`` rows (or 8 per expert) when there are more."""
    pool = max(SEED_POOL, 8 * k)
    if len(x) > pool:
        x = x[torch.randperm(len(x), generator=gen)[:pool].to(x.device)]
    first = int(torch.randint(len(x), (1,), generator=gen))
    chosen = [first]
    nearest = 2 - 2 * (x @ x[first])
    for _ in range(1, k):
        probs = nearest.clamp_min(0).cpu()  # drawn on the CPU generator, wherever x is
        idx = int(torch.multinomial(probs / probs.sum(), 1, generator=gen)) if probs.sum() > 0 \
            else int(torch.randint(len(x), (1,), generator=gen))
        chosen.append(idx)
        nearest = torch.minimum(nearest, 2 - 2 * (x @ x[idx]))
    return x[chosen].clone()


class Swaps:
    """Rounds of exchanges between experts, in place on ``labels``, for the similarities ``scores``
    (rows x experts) to fixed centroids: in each round, for every pair of experts (a, b), the row of
    a that gains most by moving to b and the row of b that gains most by moving to a swap places
    when their gains sum above zero (each row at most once per round; sizes stay equal). A round
    recomputes the best moves only of the experts the previous round changed: the others' rows
    and their gains are as they were."""

    def __init__(self, scores: torch.Tensor, labels: torch.Tensor, k: int):
        self.scores, self.labels, self.k = scores, labels, k
        self.members = torch.argsort(labels, stable=True).view(k, -1)  # each expert's rows, ascending
        self.best, self.where = self._moves(torch.arange(k, device=labels.device))

    def _moves(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each of ``experts`` and every expert b: the best gain of moving one of its rows to b,
        and that row's place among its members."""
        s = self.scores[self.members[experts]]  # (experts, size, k)
        return (s - s.gather(2, experts[:, None, None].expand(-1, s.shape[1], 1))).max(dim=1)

    def round(self) -> int:
        """One round of exchanges; returns the swaps made."""
        pair = self.best + self.best.T
        a, b = torch.triu(pair > 1e-6, diagonal=1).nonzero(as_tuple=True)
        rank = torch.argsort(pair[a, b], descending=True, stable=True)
        a, b = a[rank], b[rank]
        size, flat = self.members.shape[1], self.members.view(-1)
        at_ab, at_ba = a * size + self.where[a, b], b * size + self.where[b, a]
        used, places, rows = set(), [], []
        for p, q, i, j in zip(at_ab.tolist(), at_ba.tolist(), flat[at_ab].tolist(), flat[at_ba].tolist()):
            if i not in used and j not in used:
                used.update((i, j))
                places += [p, q]
                rows += [j, i]
        if rows:
            on = self.labels.device
            places_t = torch.as_tensor(places, device=on)
            flat[places_t] = torch.as_tensor(rows, device=on)
            self.labels[flat[places_t]] = places_t // size
            touched = torch.unique(places_t // size)
            self.members[touched] = self.members[touched].sort(dim=1).values
            self.best[touched], self.where[touched] = self._moves(touched)
        return len(rows) // 2


def swap_pass(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """One round of ``Swaps`` from scratch; returns the swaps made."""
    return Swaps(scores, labels, k).round()


def seedings(rows: int, dims: int, num_expert: int) -> int:
    """How many seedings ``balanced_kmeans`` screens by default for points of this shape."""
    return RESTARTS if rows * dims * num_expert <= SCREEN_WORK else 1


def balanced_kmeans(rows, num_expert: int, seed: int = 0, iterations: int = 30, swap_rounds: int = 10,
                    restarts: int | None = None, screen: int = SCREEN, device: str | torch.device = "cpu") -> np.ndarray:
    """One expert label per row (numpy int array), every expert holding exactly
    ``len(rows) / num_expert`` rows; deterministic for a seed (and a device). Each iteration's
    balanced assignment is refined by up to ``swap_rounds`` rounds of pairwise exchanges
    (``swap_pass``), as same-size k-means does, before the centroids move. k-means starts from
    ``restarts`` seedings (default: ``seedings``; the first the one ``restarts=1`` uses), runs each ``screen``
    iterations, and continues the split whose rows are closest to their centroids (mean cosine)
    to ``iterations`` in all: most of what k-means libraries' ``n_init`` gains, at a fraction of
    its cost."""
    x = F.normalize(torch.as_tensor(rows, dtype=torch.float32).to(device), dim=1)
    size = check_experts(len(x), num_expert)
    gen = torch.Generator().manual_seed(seed)
    restarts = seedings(*x.shape, num_expert) if restarts is None else restarts
    runs = [_kmeans(x, num_expert, size, _init_centroids(x, num_expert, gen), min(screen, iterations), swap_rounds)
            for _ in range(max(1, restarts))]
    labels, converged = max(runs, key=lambda run: _objective(x, run[0], num_expert))
    if not converged and iterations > screen:
        labels, _ = _kmeans(x, num_expert, size, _centroids(x, labels, num_expert), iterations - screen, swap_rounds,
                            labels)
    return labels.cpu().numpy()


def _objective(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    return float((x * _centroids(x, labels, k)[labels]).sum())


def _kmeans(x: torch.Tensor, k: int, size: int, centroids: torch.Tensor, iterations: int, swap_rounds: int,
            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """(labels, whether the assignment stopped changing) after up to ``iterations`` iterations."""
    for _ in range(iterations):
        scores = x @ centroids.T
        new = balanced_assign(scores, size)
        swaps = Swaps(scores, new, k) if swap_rounds and k > 1 else None
        for _ in range(swap_rounds if swaps else 0):
            if swaps.round() <= len(x) // 2000:
                break
        if labels is not None and torch.equal(new, labels):
            return labels, True
        labels = new
        centroids = _centroids(x, labels, k)
    return labels, False


def coactivation_rows(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """(neurons, tokens): which of the sample tokens x (tokens, d_model) make each neuron fire.
    Clustering these rows puts neurons that fire together into one expert, so a few experts hold
    most of a token's activation (the paper's co-activation split, done with balanced k-means)."""
    return (x.float() @ w1.float().T + b1.float() > 0).T.float()


def random_split(n_rows: int, num_expert: int, seed: int = 0) -> np.ndarray:
    """The baseline the paper compares to: a random partition into equal experts."""
    size = check_experts(n_rows, num_expert)
    perm = np.random.default_rng(seed).permutation(n_rows)
    labels = np.empty(n_rows, dtype=np.int64)
    labels[perm] = np.arange(n_rows) // size
    return labels


def expert_centroids(rows, labels: np.ndarray) -> torch.Tensor:
    """(num_expert, dim): the normalised mean of each expert's normalised rows (the router's
    initial first layer)."""
    x = F.normalize(torch.as_tensor(np.asarray(rows), dtype=torch.float32), dim=1)
    lab = torch.as_tensor(labels, dtype=torch.long)
    return _centroids(x, lab, int(lab.max()) + 1)


def cosine_to_centroid(rows, labels: np.ndarray) -> float:
    """Mean cosine similarity of each (normalised) row to its expert's normalised centroid."""
    x = F.normalize(torch.as_tensor(np.asarray(rows), dtype=torch.float32), dim=1)
    lab = torch.as_tensor(labels, dtype=torch.long)
    return _objective(x, lab, int(lab.max()) + 1) / len(x)
