"""2:4 mask functions (kernels.sparsity) against loop-by-loop references, plus their invariants.

The references live in bench/masks_reference.py (bench/masks.py times them too); they are loaded
here by file path, so the bench folder is not put on sys.path.
"""
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

import kernels
import kernels.sparsity as sp
from kernels import m4n2_1d, m4n2_2d_best, m4n2_2d_greedy
from kernels.sparsity import MASK_FUNCTIONS, get_mask_function, patterns_2d, short_lines

_spec = importlib.util.spec_from_file_location(
    "masks_reference", Path(__file__).resolve().parent.parent / "bench" / "masks_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

NAMES = ["m4n2_1d", "m4n2_2d_greedy", "m4n2_2d_best"]
SHAPES = [(8, 8), (16, 32), (64, 128)]


def weights(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return torch.randn(*shape, generator=g)
    if kind == "ties":  # integers with many repeats: equal magnitudes, opposite signs, zeros
        return torch.randint(-3, 4, shape, generator=g).float()
    if kind == "near":  # ties broken by a few ulps: the float32 screen of m4n2_2d_best must defer
        base = torch.randint(1, 4, shape, generator=g).float()
        return base * (1 + torch.randint(-2, 3, shape, generator=g).float() * 2.0 ** -23)
    if kind == "spread":  # magnitudes 2**-20 to 2**23 in a block; short mantissas keep float64 sums exact
        return (torch.randint(-7, 8, shape, generator=g) * 2.0 ** torch.randint(-20, 21, shape, generator=g)).float()
    raise ValueError(kind)


def as_tensor(mask_lists, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(mask_lists, dtype=like.dtype)


def blocks(t: torch.Tensor) -> torch.Tensor:
    """(block rows, block cols, 4, 4) view of a 2-D tensor."""
    r, c = t.shape
    return t.reshape(r // 4, 4, c // 4, 4).permute(0, 2, 1, 3)


# ------------------------------------------------------------------------ identical to reference

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["randn", "ties", "near", "spread"])
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_to_the_loop_reference(name, kind, shape):
    for seed in range(3):
        w = weights(kind, shape, seed)
        got = MASK_FUNCTIONS[name](w)
        want = as_tensor(ref.REFERENCES[name](w), w)
        assert torch.equal(got, want), (name, kind, shape, seed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_identical_to_the_reference_in_other_dtypes(name, dtype):
    for kind, seed in itertools.product(["randn", "ties"], range(2)):
        w = weights(kind, (16, 32), seed).to(dtype)
        assert torch.equal(MASK_FUNCTIONS[name](w), as_tensor(ref.REFERENCES[name](w), w)), (kind, seed)


def test_documented_tie_breaks_on_hand_made_blocks():
    # 1d: of equal magnitudes the lower column wins, whatever the signs.
    assert m4n2_1d(torch.tensor([[1.0, -1.0, 1.0, -1.0]])).tolist() == [[1, 1, 0, 0]]
    assert m4n2_1d(torch.tensor([[0.0, 2.0, -2.0, 2.0]])).tolist() == [[0, 1, 1, 0]]
    # all-equal block: greedy visits row-major, best takes the first pattern (rows 01,01,23,23).
    w = torch.ones(4, 4)
    assert m4n2_2d_greedy(w).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert m4n2_2d_best(w).flatten().tolist() == list(patterns_2d()[0])
    assert m4n2_2d_best(torch.zeros(4, 4)).flatten().tolist() == list(patterns_2d()[0])
    # greedy can end short: 9 8 7 6 5 4 fill rows 0-2 and columns 0-2, so row 3 and column 3
    # only get the 1 (and the zeros, visited row-major, all sit in a full line).
    w = torch.tensor([[9.0, 8, 0, 0], [7, 0, 6, 0], [0, 5, 4, 0], [0, 0, 0, 1]])
    g = m4n2_2d_greedy(w)
    assert g.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    assert short_lines(g) == 2 and short_lines(m4n2_2d_best(w)) == 0


def test_patterns_are_the_90_in_documented_order():
    pats = patterns_2d()
    assert pats == ref.ref_patterns_2d()
    assert len(pats) == len(set(pats)) == 90
    for p in pats:
        m = torch.tensor(p).view(4, 4)
        assert m.sum(0).tolist() == m.sum(1).tolist() == [2, 2, 2, 2]
    assert pats == sorted(pats, reverse=True)  # the same order: lexicographic, descending


def test_sorting_network_sorts_every_0_1_input():
    x = ((torch.arange(1 << 16)[None, :] >> torch.arange(16)[:, None]) & 1).tolist()
    lanes = [list(row) for row in x]
    for i, j in sp._NET16:
        lanes[i], lanes[j] = ([max(a, b) for a, b in zip(lanes[i], lanes[j])],
                              [min(a, b) for a, b in zip(lanes[i], lanes[j])])
    s = torch.tensor(lanes)
    assert len(sp._NET16) == 60 and bool((s[:-1] >= s[1:]).all())


# ---------------------------------------------------------------------------------- invariants

@pytest.mark.parametrize("seed", range(3))
def test_structure_of_the_masks(seed):
    w = weights("randn", (64, 128), seed)
    one = m4n2_1d(w)
    assert one.view(64, 32, 4).sum(-1).eq(2).all()
    best = blocks(m4n2_2d_best(w))
    assert best.sum(-1).eq(2).all() and best.sum(-2).eq(2).all()
    assert short_lines(m4n2_2d_best(w)) == 0
    greedy_mask = m4n2_2d_greedy(w)
    greedy = blocks(greedy_mask)
    assert greedy.sum(-1).le(2).all() and greedy.sum(-2).le(2).all()
    assert short_lines(greedy_mask) == int(greedy.sum(-1).lt(2).sum() + greedy.sum(-2).lt(2).sum())
    assert short_lines(greedy_mask.bool()) == short_lines(greedy_mask) > 0  # any dtype, nonzero = kept
    for mask in (one, best, greedy):
        assert ((mask == 0) | (mask == 1)).all()


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_best_keeps_at_least_the_greedy_mass_where_greedy_keeps_a_full_pattern(kind):
    # Where greedy ends with no short line its mask is one of the 90 patterns, so best >= greedy.
    # Where it ends short it is not, and it can keep more than best (next test): about 3% of the
    # blocks of a Gaussian matrix, all of them short ones. In total, best keeps more.
    for seed in range(3):
        w = weights(kind, (64, 128), seed)
        a = blocks(w.abs().double())
        best = (a * blocks(m4n2_2d_best(w)).double()).sum((-1, -2))
        g = blocks(m4n2_2d_greedy(w))
        greedy = (a * g.double()).sum((-1, -2))
        full = g.sum(-1).eq(2).all(-1) & g.sum(-2).eq(2).all(-1)
        assert full.any() and (best >= greedy)[full].all()
        assert best.sum() >= greedy.sum()


def test_a_short_greedy_block_can_outweigh_best():
    w = torch.tensor([[9.0, 8, 0, 0], [7, 0, 6, 0], [0, 5, 4, 0], [0, 0, 0, 1]])
    assert (w * m4n2_2d_greedy(w)).sum() == 40  # 9 8 7 6 5 4 1: no pattern holds all six above 1
    assert (w * m4n2_2d_best(w)).sum() == 36    # 9 8 7 6 5 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_mask_has_the_weight_shape_dtype_and_device(name, dtype):
    w = torch.nn.Parameter(weights("randn", (8, 16), 0).to(dtype))
    m = MASK_FUNCTIONS[name](w)
    assert m.shape == w.shape and m.dtype == dtype and m.device == w.device and not m.requires_grad


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_and_empty_weights(name):
    w = weights("randn", (32, 16), 1)
    f = MASK_FUNCTIONS[name]
    assert torch.equal(f(w.t()), f(w.t().contiguous()))
    assert f(torch.empty(0, 8)).shape == (0, 8)


@pytest.mark.parametrize("name", NAMES)
def test_nan_and_inf_weights_still_give_a_0_1_mask(name):
    w = weights("randn", (16, 32), 0)
    w[0, 0], w[5, 9], w[10, 20] = float("nan"), float("inf"), -float("inf")
    m = MASK_FUNCTIONS[name](w)
    assert m.shape == w.shape and ((m == 0) | (m == 1)).all()


def test_m4n2_1d_takes_any_number_of_rows():
    w = weights("randn", (3, 8), 0)
    assert torch.equal(m4n2_1d(w), as_tensor(ref.ref_m4n2_1d(w), w))


# -------------------------------------------------- chunks, threads, float32 screen: same masks

@pytest.mark.parametrize("threads", [1, 2])
def test_many_chunks_on_threads_give_the_same_masks(monkeypatch, threads):
    w = weights("ties", (64, 128), 0) + weights("randn", (64, 128), 1) * 0.01
    want = {name: as_tensor(ref.REFERENCES[name](w), w) for name in NAMES}
    # 3 rows (1d) or 3 block rows (2d) per chunk: 22 and 6 chunks, the last one shorter.
    for attr in ("_CHUNK_1D", "_CHUNK_GREEDY", "_CHUNK_BEST"):
        monkeypatch.setattr(sp, attr, 3 * 32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in NAMES:
            assert torch.equal(MASK_FUNCTIONS[name](w), want[name]), name
            assert torch.get_num_threads() == threads  # restored after the call
    finally:
        torch.set_num_threads(before)


def test_best_without_the_float32_screen_is_the_same(monkeypatch):
    ws = [weights(kind, (16, 32), seed) for kind in ("randn", "ties", "near") for seed in range(2)]
    screened = [m4n2_2d_best(w) for w in ws]
    monkeypatch.setattr(sp, "_fp32_matmul_is_ieee", lambda device: False)
    assert all(torch.equal(m4n2_2d_best(w), m) for w, m in zip(ws, screened))


def test_the_float32_screen_defers_near_and_exact_ties_to_float64(monkeypatch):
    redone = []
    exact = sp._best_exact
    monkeypatch.setattr(sp, "_best_exact", lambda a, *rest: redone.append(a.shape[1]) or exact(a, *rest))
    counts = {}
    for kind in ("randn", "ties", "near"):
        redone.clear()
        w = weights(kind, (64, 128), 0)
        assert torch.equal(m4n2_2d_best(w), as_tensor(ref.ref_m4n2_2d_best(w), w))
        counts[kind] = sum(redone)
    assert counts["randn"] < 10 and counts["ties"] > 100 and counts["near"] > 100, counts


def test_cuda_masks_equal_the_cpu_masks():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    for kind, name in itertools.product(["randn", "ties", "near"], NAMES):
        w = weights(kind, (64, 128), 0)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = MASK_FUNCTIONS[name](w.to(dtype).cuda())
            assert got.is_cuda and torch.equal(got.cpu(), MASK_FUNCTIONS[name](w.to(dtype))), (kind, name, dtype)


# ---------------------------------------------------------------------------------- bad inputs

def test_bad_shapes_raise_one_sentence():
    with pytest.raises(ValueError) as e:
        m4n2_2d_greedy(torch.zeros(6, 16))
    assert str(e.value) == ("m4n2_2d_greedy works on 4x4 blocks, but the weight of shape (6, 16) has "
                            "dimension 0 (6 rows) not a multiple of 4: pad the weight, skip that matrix, "
                            "or fail.")
    with pytest.raises(ValueError) as e:
        m4n2_2d_best(torch.zeros(6, 10))
    assert str(e.value) == ("m4n2_2d_best works on 4x4 blocks, but the weight of shape (6, 10) has "
                            "dimension 0 (6 rows) and dimension 1 (10 columns) not a multiple of 4: pad "
                            "the weight, skip that matrix, or fail.")
    with pytest.raises(ValueError) as e:
        m4n2_1d(torch.zeros(8, 6))
    assert str(e.value) == ("m4n2_1d works on groups of 4 consecutive weights in a row, but the weight of "
                            "shape (8, 6) has dimension 1 (6 columns) not a multiple of 4: pad the weight, "
                            "skip that matrix, or fail.")
    with pytest.raises(ValueError) as e:
        m4n2_2d_best(torch.zeros(2, 4, 4))
    assert str(e.value) == "m4n2_2d_best takes a 2-D weight, but got a 3-D tensor of shape (2, 4, 4)."
    with pytest.raises(ValueError) as e:
        m4n2_1d(torch.zeros(8))
    assert str(e.value) == "m4n2_1d takes a 2-D weight, but got a 1-D tensor of shape (8,)."
    with pytest.raises(ValueError) as e:
        m4n2_2d_greedy(torch.zeros(4, 4, dtype=torch.int32))
    assert str(e.value) == "m4n2_2d_greedy takes a floating-point weight, but got dtype torch.int32."


def test_names():
    assert list(MASK_FUNCTIONS) == NAMES
    assert all(get_mask_function(n) is getattr(kernels, n) for n in NAMES)
    assert set(NAMES) <= set(kernels.__all__)
    assert kernels.get_mask_function is get_mask_function and kernels.short_lines is short_lines
    with pytest.raises(ValueError) as e:
        get_mask_function("x")
    assert str(e.value) == "unknown prune function 'x'; expected one of m4n2_1d, m4n2_2d_greedy, m4n2_2d_best"
