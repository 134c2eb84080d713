"""Loop-by-loop references for the 2:4 mask functions of kernels.sparsity.

Straight from the algorithms' descriptions: Python loops over groups / blocks and over entries,
with the same documented tie-breaking, on Python floats (float64). Slow on purpose: they are the
yardstick that tests/test_masks.py holds the vectorised masks to (identical masks), and the
baseline that bench/masks.py times on a slice. Each takes a 2-D torch tensor (dimensions multiples
of 4) and returns the mask as a list of lists of 0/1.
"""
from __future__ import annotations

import itertools


def _magnitudes(weight) -> list[list[float]]:
    return [[abs(float(v)) for v in row] for row in weight.detach().cpu().double().tolist()]


def ref_m4n2_1d(weight) -> list[list[int]]:
    """Per row, per group of 4: rank the entries by (|w| descending, index ascending), keep 2."""
    a = _magnitudes(weight)
    mask = [[0] * len(row) for row in a]
    for r, row in enumerate(a):
        for g in range(0, len(row), 4):
            order = sorted(range(4), key=lambda i: (-row[g + i], i))
            for i in order[:2]:
                mask[r][g + i] = 1
    return mask


def _blocks(a):
    for br in range(0, len(a), 4):
        for bc in range(0, len(a[0]) if a else 0, 4):
            yield br, bc, [a[br + i][bc + j] for i in range(4) for j in range(4)]


def ref_m4n2_2d_greedy(weight) -> list[list[int]]:
    """Per 4x4 block: visit the 16 entries by (|w| descending, row-major position ascending); keep
    one while its row and its column (within the block) each hold fewer than 2 kept."""
    a = _magnitudes(weight)
    mask = [[0] * len(row) for row in a]
    for br, bc, block in _blocks(a):
        row_count, col_count = [0] * 4, [0] * 4
        for p in sorted(range(16), key=lambda p: (-block[p], p)):
            i, j = divmod(p, 4)
            if row_count[i] < 2 and col_count[j] < 2:
                mask[br + i][bc + j] = 1
                row_count[i] += 1
                col_count[j] += 1
    return mask


def ref_patterns_2d() -> list[tuple[int, ...]]:
    """The 90 patterns (exactly 2 per row and per column), flattened row-major, in the documented
    order: rows from the column pairs in combinations order, itertools.product over rows."""
    pairs = list(itertools.combinations(range(4), 2))
    patterns = []
    for choice in itertools.product(pairs, repeat=4):
        pattern = tuple(1 if j in choice[i] else 0 for i in range(4) for j in range(4))
        if all(sum(pattern[4 * i + j] for i in range(4)) == 2 for j in range(4)):
            patterns.append(pattern)
    return patterns


def ref_m4n2_2d_best(weight) -> list[list[int]]:
    """Per 4x4 block: of the 90 patterns, the first (in ref_patterns_2d order) with the largest
    sum of kept |w|, summed left to right in float64."""
    a = _magnitudes(weight)
    patterns = ref_patterns_2d()
    mask = [[0] * len(row) for row in a]
    for br, bc, block in _blocks(a):
        best, best_score = None, None
        for pattern in patterns:
            score = 0.0
            for p in range(16):
                if pattern[p]:
                    score += block[p]
            if best_score is None or score > best_score:  # strictly greater: the first one wins ties
                best, best_score = pattern, score
        for p in range(16):
            mask[br + p // 4][bc + p % 4] = best[p]
    return mask


REFERENCES = {"m4n2_1d": ref_m4n2_1d, "m4n2_2d_greedy": ref_m4n2_2d_greedy, "m4n2_2d_best": ref_m4n2_2d_best}
