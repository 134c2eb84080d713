"""2:4 pruning masks (the BMCook / NVIDIA apex ASP mask functions), vectorised over blocks.

Each function takes a 2-D weight (any floating dtype, CPU or CUDA) and returns a mask of the same
shape, dtype and device: 1 where the weight is kept, 0 where it is pruned.

* ``m4n2_1d``: in every group of 4 consecutive weights of a row, keep the 2 of largest magnitude.
* ``m4n2_2d_greedy``: in every 4x4 block, visit the entries from largest to smallest magnitude and
  keep one while its block row and block column each hold fewer than 2 kept (apex's
  ``mn_2d_greedy``); it can end with a block row or column holding fewer than 2, which
  ``short_lines`` counts.
* ``m4n2_2d_best``: in every 4x4 block, of the 90 patterns that keep exactly 2 per block row and
  per block column, the one with the largest kept magnitude.

Ties are broken deterministically, as each docstring says, and the same way on every device.
NaN weights give a 0/1 mask of the right shape and dtype whose content is unspecified.

How it runs: no Python loop over groups or blocks. The matrix is cut into chunks of whole rows
(16K to 32K groups or blocks on CPU, sized for one core's cache; about 4M on a GPU) and each chunk
goes through a fixed sequence of tensor operations over all its blocks at once. On CPU the chunks
are spread over ``torch.get_num_threads()`` Python threads, and for the duration of the call
torch's intra-op thread count is set to 1 (then restored): each operation then runs on the thread
that issued it. Thousands of mid-sized operations each split across intra-op threads cost more
than they gain, badly so on a CPU shared with other work, where every split waits for a thread
that is not running (measured on 2 cores shared with a training job, 2 intra-op threads: m4n2_1d
took over 20 s at GPT-J size instead of 0.5 s).
"""
from __future__ import annotations

import itertools
import sys
import threading

import torch

from kernels.threads import parallel_map

__all__ = ["m4n2_1d", "m4n2_2d_greedy", "m4n2_2d_best", "short_lines", "patterns_2d",
           "MASK_FUNCTIONS", "get_mask_function"]

# Groups (1d) or blocks (2d) per chunk, on CPU; on a GPU one chunk is most of a large matrix.
_CHUNK_1D = 1 << 15
_CHUNK_GREEDY = 1 << 14
_CHUNK_BEST = 1 << 14
_CHUNK_CUDA = 1 << 22

# A 60-comparator, 10-layer sorting network on 16 inputs (Green's construction, as listed by
# B. Dobbelaere); comparator (i, j), i < j, puts the larger key in lane i. The test checks that it
# sorts all 2**16 0/1 inputs, which by the 0-1 principle means that it sorts any input. (One
# operation per comparator on 1-D lanes beats fewer, larger operations on strided views of all
# 16 lanes, as in a bitonic network: the lanes stay in cache.)
_NET16 = (
    (0, 13), (1, 12), (2, 15), (3, 14), (4, 8), (5, 6), (7, 11), (9, 10),
    (0, 5), (1, 7), (2, 9), (3, 4), (6, 13), (8, 14), (10, 15), (11, 12),
    (0, 1), (2, 3), (4, 5), (6, 8), (7, 9), (10, 11), (12, 13), (14, 15),
    (0, 2), (1, 3), (4, 10), (5, 11), (6, 7), (8, 9), (12, 14), (13, 15),
    (1, 2), (3, 12), (4, 6), (5, 7), (8, 10), (9, 11), (13, 14),
    (1, 4), (2, 6), (5, 8), (7, 10), (9, 13), (11, 14),
    (2, 4), (3, 6), (9, 12), (11, 13),
    (3, 5), (6, 8), (7, 9), (10, 12),
    (3, 4), (5, 6), (7, 8), (9, 10), (11, 12),
    (6, 7), (8, 9),
)

# Which half of an int64 holds its low 32 bits when the int64 is viewed as two int32s.
_LO, _HI = (0, 1) if sys.byteorder == "little" else (1, 0)

_cache: dict = {}


def _cached(key, make):
    """Small constant tables, made once per key (device, dtype)."""
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


# ------------------------------------------------------------------------------ checks, chunking

def _check(weight, name: str, both_dims: bool, floating: bool = True) -> torch.Tensor:
    """The weight, detached and contiguous, after the checks every mask function makes."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} takes a 2-D torch tensor, but got {type(weight).__name__}.")
    if weight.dim() != 2:
        raise ValueError(f"{name} takes a 2-D weight, but got a {weight.dim()}-D tensor of shape "
                         f"{tuple(weight.shape)}.")
    if floating and not weight.is_floating_point():
        raise ValueError(f"{name} takes a floating-point weight, but got dtype {weight.dtype}.")
    rows, cols = weight.shape
    bad = []
    if both_dims and rows % 4:
        bad.append(f"dimension 0 ({rows} rows)")
    if cols % 4:
        bad.append(f"dimension 1 ({cols} columns)")
    if bad:
        unit = "4x4 blocks" if both_dims else "groups of 4 consecutive weights in a row"
        raise ValueError(f"{name} works on {unit}, but the weight of shape {tuple(weight.shape)} has "
                         f"{' and '.join(bad)} not a multiple of 4: pad the weight, skip that matrix, "
                         f"or fail.")
    return weight.detach().contiguous()


def _chunks(shape, row_step: int, per_chunk: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges [r0, r1) in steps of ``row_step`` rows (1 for 1x4 groups, 4 for 4x4 blocks),
    each with about ``per_chunk`` groups or blocks (at least one step of rows)."""
    rows, cols = shape
    if device.type != "cpu":
        per_chunk = _CHUNK_CUDA
    step = max(1, per_chunk // max(cols // 4, 1)) * row_step
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _run(device: torch.device, chunks, work) -> None:
    """Call ``work(r0, r1)`` for every chunk; on CPU through ``kernels.threads.parallel_map`` (see
    the module docstring)."""
    if device.type != "cpu":
        for chunk in chunks:
            work(*chunk)
        return
    parallel_map(lambda chunk: work(*chunk), chunks)


def _scratch(local: threading.local, name: str, make):
    """A per-thread work buffer, made on the thread's first chunk."""
    buf = getattr(local, name, None)
    if buf is None:
        buf = make()
        setattr(local, name, buf)
    return buf


# ---------------------------------------------------------------------------------------- m4n2_1d

def m4n2_1d(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask along rows: in every group of 4 consecutive weights of a row keep the 2 of largest
    magnitude |w| (the best of the 6 patterns by kept magnitude).

    Ties: entries are ranked by (|w| descending, position in the group ascending), so of equal
    magnitudes the one with the lower column index is kept. Every group keeps exactly 2. The
    number of columns must be a multiple of 4 (any number of rows).
    """
    w = _check(weight, "m4n2_1d", both_dims=False)
    rows, cols = w.shape
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    dev = w.device
    chunks = _chunks(w.shape, 1, _CHUNK_1D, dev)
    most = max(r1 - r0 for r0, r1 in chunks) * cols
    f32 = torch.float32
    # Periodic over a group: right[d - 1][k] = 1 if entry k has a group mate d places to its right;
    # first[k] = the number of group mates to its left (its position in the group).
    right = torch.tensor([[1.0 if i + d <= 3 else 0.0 for i in range(4)] for d in (1, 2, 3)],
                         dtype=f32, device=dev).repeat(1, most // 4)
    first = torch.arange(4, dtype=f32, device=dev).repeat(most // 4)
    local = threading.local()

    def work(r0: int, r1: int) -> None:
        m = (r1 - r0) * cols
        x = _scratch(local, "x", lambda: torch.zeros(most + 3, dtype=w.dtype, device=dev))
        beats = _scratch(local, "beats", lambda: torch.zeros(3, most + 3, dtype=f32, device=dev))
        rank = _scratch(local, "rank", lambda: torch.empty(most, dtype=f32, device=dev))[:m]
        torch.abs(w[r0:r1].view(-1), out=x[:m])
        rank.copy_(first[:m])
        for d in (1, 2, 3):
            # beats[d - 1][3 + k] = 1 if entry k + d (same group) beats entry k: |w_k+d| > |w_k|.
            b = beats[d - 1]
            torch.gt(x[d:m + d], x[:m], out=b[3:m + 3])
            b[3:m + 3].mul_(right[d - 1, :m])
            # rank of k = its position (every earlier mate starts out beating it, ties included)
            # + later mates that beat it - earlier mates it beats (b[3 + k - d] for mate k - d).
            rank.add_(b[3:m + 3]).sub_(b[3 - d:m + 3 - d])
        torch.lt(rank, 1.5, out=out[r0:r1].view(-1))  # ranks 0 and 1 are kept

    _run(dev, chunks, work)
    return out


# --------------------------------------------------------------------------------- m4n2_2d_greedy

def _greedy_codes(device) -> torch.Tensor:
    """(16,) int32 per block position p = 4 * row + col: bit 31 - p (the position's mask bit, and
    the tie-break: a lower p is a larger code), plus an increment of the row's and the column's
    2-bit counter (row r in bits 2r..2r+1, column c in bits 8+2c..9+2c)."""
    def make():
        codes = [(1 << (31 - p)) | (1 << (2 * (p // 4))) | (1 << (8 + 2 * (p % 4))) for p in range(16)]
        codes = [c - (1 << 32) if c >= 1 << 31 else c for c in codes]  # as int32 bit patterns
        return torch.tensor(codes, dtype=torch.int32, device=device)

    return _cached(("greedy", device), make)


def _nibble_table(dtype, device) -> torch.Tensor:
    """(16, 4): row v holds the 4 bits of v, bit 3 first, in the mask dtype."""
    return _cached(("nibble", dtype, device), lambda: torch.tensor(
        [[(v >> (3 - j)) & 1 for j in range(4)] for v in range(16)], dtype=dtype, device=device))


def m4n2_2d_greedy(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask in both directions, greedy (apex ASP's ``mn_2d_greedy`` with m=4, n=2): in every
    4x4 block visit the 16 entries from largest to smallest |w| and keep an entry while its block
    row and its block column each hold fewer than 2 kept entries.

    Ties: the visiting order is (|w| descending, position in the block ascending), positions
    numbered row-major (4 * row + column), so of equal magnitudes the entry in the upper row, then
    the left column, is visited first. (Apex sorts with numpy's default, unstable argsort, so its
    ties fall as they may.) No block row or column ever holds more than 2; some may end with
    fewer, see ``short_lines``. Both dimensions must be multiples of 4.
    """
    w = _check(weight, "m4n2_2d_greedy", both_dims=True)
    rows, cols = w.shape
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    dev = w.device
    nb = cols // 4
    chunks = _chunks(w.shape, 4, _CHUNK_GREEDY, dev)
    most = max(r1 - r0 for r0, r1 in chunks) // 4 * nb
    codes = _greedy_codes(dev)
    nibble_table = _nibble_table(w.dtype, dev)
    shifts = torch.tensor([28, 24, 20, 16], dtype=torch.int32, device=dev).view(1, 4, 1)
    local = threading.local()

    def work(r0: int, r1: int) -> None:
        h = (r1 - r0) // 4
        n = h * nb
        lanes_in = w[r0:r1].view(h, 4, nb, 4).permute(1, 3, 0, 2)  # lane p = 4i + j of block (hb, b)
        if w.dtype != torch.float64:
            # Key of an entry: int64 = (fp32 bits of |w|) << 32 | code. Non-negative fp32 bits
            # order like the values; the codes make keys distinct and order ties by position.
            b = _scratch(local, "keys", lambda: torch.empty(17, most, 2, dtype=torch.int32, device=dev))[:, :n]
            b[:16, :, _LO].copy_(codes[:, None].expand(16, n))
            hi = b[:16, :, _HI].view(torch.float32).view(4, 4, h, nb)
            if w.dtype == torch.float32:
                torch.abs(lanes_in, out=hi)
            else:
                hi.copy_(lanes_in).abs_()  # fp16 / bf16 -> fp32 is exact
            lanes = [b[p].view(torch.int64).view(n) for p in range(17)]
            spare = lanes.pop()
            for i, j in _NET16:  # sort descending: lane 0 ends up with the largest key
                torch.maximum(lanes[i], lanes[j], out=spare)
                torch.minimum(lanes[i], lanes[j], out=lanes[j])
                lanes[i], spare = spare, lanes[i]
            steps = lanes  # int64 keys, largest first: their low 32 bits are the codes
        else:
            # float64 weights leave no room for the code beside 63 bits of |w|: a stable sort.
            order = torch.sort(lanes_in.reshape(16, n).abs(), dim=0, descending=True, stable=True).indices
            steps = codes.to(torch.int64)[order].unbind(0)
        # The greedy, on the codes: x gathers the codes of the kept entries (as their sum: no 2-bit
        # counter goes past 2 and no mask bit is added twice). Whole keys are added: their |w|
        # bits only reach bits 32 and up of x, as carries only go up, and nothing reads those.
        x = torch.zeros(n, dtype=torch.int64, device=dev)
        ok = torch.empty_like(x)
        full = torch.empty_like(x)
        for t in steps:  # the 16 entries of every block in rank order, all blocks at once
            torch.bitwise_left_shift(t, 1, out=full).bitwise_and_(0xAAAA)  # "count is 2" bits of its lines
            torch.bitwise_and(x, full, out=ok)
            ok.sub_(1).bitwise_right_shift_(63)  # all bits set where neither line is full, else 0
            x.add_(ok.bitwise_and_(t))             # keep: set its mask bit, count its row and column
        # Bits 31..16 of x are the mask of positions 0..15: one block row (4 bits) at a time.
        nibbles = ((x.view(h, 1, nb) >> shifts) & 15).view(-1)  # (h, 4, nb): block row i of each block
        torch.index_select(nibble_table, 0, nibbles, out=out[r0:r1].view(-1, 4))

    _run(dev, chunks, work)
    return out


def short_lines(mask: torch.Tensor) -> int:
    """Number of block rows plus block columns, over all 4x4 blocks of ``mask`` (any dtype, nonzero
    = kept), that keep fewer than 2 entries (0 for a mask from ``m4n2_2d_best``; greedy masks can
    have some)."""
    m = _check(mask, "short_lines", both_dims=True, floating=False)
    if m.numel() == 0:
        return 0
    blocks = (m != 0).view(m.shape[0] // 4, 4, m.shape[1] // 4, 4)
    per_row = blocks.sum(3, dtype=torch.int32)
    per_col = blocks.sum(1, dtype=torch.int32)
    return int((per_row < 2).sum()) + int((per_col < 2).sum())


# ----------------------------------------------------------------------------------- m4n2_2d_best

def patterns_2d() -> list[tuple[int, ...]]:
    """The 90 4x4 0/1 patterns with exactly 2 ones per row and per column, each flattened
    row-major (16 entries), in this order: every row is one of the 6 pairs of columns taken in
    ``itertools.combinations(range(4), 2)`` order, (0,1) (0,2) (0,3) (1,2) (1,3) (2,3), and the
    patterns follow ``itertools.product`` over the 4 rows (row 0 slowest), skipping those whose
    columns do not hold exactly 2 each."""
    def make():
        pairs = list(itertools.combinations(range(4), 2))
        pats = []
        for choice in itertools.product(pairs, repeat=4):
            if all(sum(c in pair for pair in choice) == 2 for c in range(4)):
                pats.append(tuple(1 if c in pair else 0 for pair in choice for c in range(4)))
        assert len(pats) == 90
        return pats

    return _cached("patterns", make)


def _fp32_matmul_is_ieee(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` round like IEEE float32 (no bf16 / tf32 shortcuts):
    the float32 screen of m4n2_2d_best relies on it. Only CPU is screened."""
    if device.type != "cpu":
        return False
    try:
        return torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
    except (AttributeError, RuntimeError):
        try:
            return torch.get_float32_matmul_precision() == "highest"
        except RuntimeError:
            return False


def _best_exact(a64: torch.Tensor, pats: torch.Tensor, priority: torch.Tensor) -> torch.Tensor:
    """Index of the winning pattern for each column of ``a64`` (16, m) float64 |w|: the largest
    float64 score, the first in pattern order among equal ones."""
    scores = pats @ a64                                    # (90, m)
    hit = torch.eq(scores, scores.amax(0), out=scores)     # 1.0 where a pattern reaches the max
    # Priority 90, 89, ...: the first hit. (No hit only with NaN: pattern 0, by the remainder.)
    return (90 - hit.mul_(priority).amax(0)).remainder_(90)


def m4n2_2d_best(weight: torch.Tensor) -> torch.Tensor:
    """2:4 mask in both directions, exhaustive (apex ASP's ``m4n2_2d_best``): in every 4x4 block
    keep the pattern, of the 90 that keep exactly 2 per block row and per block column, with the
    largest sum of kept |w|.

    Scores are compared as float64 sums, which are exact when the nonzero magnitudes within a
    block span less than a factor 2**26 for fp32 weights (2**39 for fp16, 2**42 for bf16; float64
    weights: float64 rounding). Ties: of equal scores, the first pattern in ``patterns_2d()`` order wins; the rule
    is applied explicitly, not left to torch.argmax (which also returns the first maximal index,
    on CPU and CUDA). Every block row and column keeps exactly 2. Both dimensions must be
    multiples of 4.

    How (CPU): every block is first scored in float32, a (90, 16) x (16, blocks) matmul. The true
    winner always scores within a relative 2**-16 of the float32 maximum (float32 rounding of
    these sums is below 2**-19 of the sum); a block with exactly one pattern that close has its
    winner, and only the others (near ties, exact ties) are rescored in float64. On a GPU, or when
    float32 matmuls may use bf16/tf32, every block is scored in float64.
    """
    w = _check(weight, "m4n2_2d_best", both_dims=True)
    rows, cols = w.shape
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    dev = w.device
    f32, f64 = torch.float32, torch.float64
    nb = cols // 4
    pats = _cached(("pats", dev), lambda: torch.tensor(patterns_2d(), dtype=f64, device=dev))  # (90, 16)
    pats32 = _cached(("pats32", dev), lambda: pats.to(f32))
    # (90 * 4, 4): row 4k + i is row i of pattern k, in the mask dtype.
    pat_rows = _cached(("pat_rows", w.dtype, dev), lambda: pats.view(360, 4).to(w.dtype))
    # (2, 90): sums [count, pattern index] over the patterns marked 1.
    count_index = _cached(("count_index", dev), lambda: torch.stack(
        [torch.ones(90, dtype=f32, device=dev), torch.arange(90, dtype=f32, device=dev)]))
    priority = _cached(("priority", dev), lambda: torch.arange(90, 0, -1, dtype=f64, device=dev).view(90, 1))
    row_of = torch.arange(4, device=dev).view(1, 4, 1)
    screen = _fp32_matmul_is_ieee(dev)
    chunks = _chunks(w.shape, 4, _CHUNK_BEST, dev)

    def work(r0: int, r1: int) -> None:
        h = (r1 - r0) // 4
        n = h * nb
        blocks = w[r0:r1].view(h, 4, nb, 4).permute(1, 3, 0, 2)  # lane p = 4i + j, a block per column
        # |w| exactly: float32 holds fp32, fp16 and bf16 values.
        a = torch.empty(4, 4, h, nb, dtype=f64 if w.dtype == f64 else f32, device=dev)
        if w.dtype == a.dtype:
            torch.abs(blocks, out=a)
        else:
            a.copy_(blocks).abs_()
        a = a.view(16, n)
        if screen:
            a32 = a if a.dtype == f32 else a.to(f32)
            scores = pats32 @ a32                                  # (90, blocks), float32
            top = scores.amax(0)
            near = torch.ge(scores, top * (1 - 2.0 ** -16) - 2.0 ** -100, out=scores)
            count, best = count_index @ near                       # one near pattern: its index
            redo = (count != 1).nonzero().view(-1)
            if redo.numel():
                best[redo] = _best_exact(a[:, redo].to(f64), pats, priority).to(f32)
        else:
            best = _best_exact(a.to(f64), pats, priority)
        idx = (best.to(torch.int64).view(h, 1, nb) * 4 + row_of).view(-1)  # block row i of the winner
        torch.index_select(pat_rows, 0, idx, out=out[r0:r1].view(-1, 4))

    _run(dev, chunks, work)
    return out


# ------------------------------------------------------------------------------------------ names

MASK_FUNCTIONS = {"m4n2_1d": m4n2_1d, "m4n2_2d_greedy": m4n2_2d_greedy, "m4n2_2d_best": m4n2_2d_best}


def get_mask_function(name: str):
    """The mask function called ``name`` (a key of MASK_FUNCTIONS)."""
    try:
        return MASK_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prune function {name!r}; expected one of "
                         f"{', '.join(MASK_FUNCTIONS)}") from None
