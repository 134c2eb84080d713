"""Parameter clustering into equal-size experts (the first step of MoEfication)."""
import numpy as np
import pytest
import torch

from pipeline.moefication import balanced_kmeans, cosine_to_centroid, random_split
from pipeline.moefication.clustering import Swaps, balanced_assign, coactivation_rows, swap_pass


def planted(n_groups=16, per_group=32, dim=64, noise=0.3, seed=0):
    """Rows drawn around ``n_groups`` directions, exactly ``per_group`` each, shuffled."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(np.repeat(np.arange(n_groups), per_group))
    centers = rng.normal(size=(n_groups, dim))
    return centers[truth] + noise * rng.normal(size=(len(truth), dim)), truth


def test_experts_have_exactly_equal_size():
    rows = np.random.default_rng(1).normal(size=(600, 32))
    for k in (1, 5, 12, 600):
        labels = balanced_kmeans(rows, k)
        assert labels.dtype.kind == "i" and labels.shape == (600,)
        assert (np.bincount(labels, minlength=k) == 600 // k).all()


def test_recovers_planted_experts_and_beats_a_random_split():
    rows, truth = planted()
    labels = balanced_kmeans(rows, 16, seed=0)
    # the same partition up to renaming: every found expert is one planted group
    assert all(len(set(truth[labels == e])) == 1 for e in range(16))
    assert cosine_to_centroid(rows, labels) > 0.9 > 0.3 > cosine_to_centroid(rows, random_split(len(rows), 16))


def test_deterministic_for_a_seed():
    rows = np.random.default_rng(2).normal(size=(256, 16))
    a = balanced_kmeans(rows, 8, seed=3)
    assert (a == balanced_kmeans(rows, 8, seed=3)).all()
    assert (random_split(256, 8, seed=1) == random_split(256, 8, seed=1)).all()
    assert not (random_split(256, 8, seed=1) == random_split(256, 8, seed=2)).all()


def test_large_layers_screen_one_seeding_and_seed_from_a_sample(monkeypatch):
    """Above ``SCREEN_WORK`` multiply-adds per iteration the default is one seeding; above
    ``SEED_POOL`` rows k-means++ draws from a sample of them, so its centroids are sampled rows."""
    from pipeline.moefication import clustering

    rows = np.random.default_rng(4).normal(size=(512, 16))
    four, one = (balanced_kmeans(rows, 8, seed=1, restarts=r) for r in (4, 1))
    assert (four != one).any()  # so that which one the default ran shows
    assert clustering.seedings(512, 16, 8) == 4 and (balanced_kmeans(rows, 8, seed=1) == four).all()
    monkeypatch.setattr(clustering, "SCREEN_WORK", 512 * 16 * 8 - 1)
    assert clustering.seedings(512, 16, 8) == 1 and (balanced_kmeans(rows, 8, seed=1) == one).all()
    x = torch.nn.functional.normalize(torch.as_tensor(rows, dtype=torch.float32), dim=1)
    monkeypatch.setattr(clustering, "SEED_POOL", 64)
    seeded = clustering._init_centroids(x, 4, torch.Generator().manual_seed(0))
    drawn = ((seeded[:, None] == x[None]).all(-1)).nonzero()[:, 1]
    assert len(drawn) == 4 and len(set(drawn.tolist())) == 4  # four distinct rows of x
    assert not torch.equal(seeded, clustering._init_centroids(x, 4, torch.Generator().manual_seed(1)))


def test_balanced_assignment_prefers_best_scores_within_capacity():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    # expert 0 has room for 2: rows 0 and 1 (the best) get it, rows 2 and 3 go to expert 1
    assert balanced_assign(scores, 2).tolist() == [0, 0, 1, 1]


def test_swaps_keep_sizes_raise_the_similarity_and_stop_where_no_pair_gains():
    k, size = 6, 5
    scores = torch.rand(k * size, k, generator=torch.Generator().manual_seed(0))
    labels = balanced_assign(scores, size)
    total = float(scores.gather(1, labels[:, None]).sum())
    start, rounds = total, 0
    while swap_pass(scores, labels, k):
        rounds += 1
        assert torch.bincount(labels, minlength=k).tolist() == [size] * k
        now = float(scores.gather(1, labels[:, None]).sum())
        assert now > total
        total = now
    assert rounds >= 1 and total > start
    own = scores.gather(1, labels[:, None]).squeeze(1)
    for i in range(len(scores)):
        for j in range(len(scores)):
            a, b = int(labels[i]), int(labels[j])
            if a != b:  # swapping any two rows of different experts gains nothing
                assert scores[i, b] + scores[j, a] - own[i] - own[j] <= 1e-6


def test_swap_rounds_that_recompute_only_the_changed_experts_swap_as_rounds_from_scratch():
    k, size = 12, 9
    scores = torch.rand(k * size, k, generator=torch.Generator().manual_seed(1))
    labels = balanced_assign(scores, size)
    fresh, swaps = labels.clone(), Swaps(scores, labels, k)
    rounds = 0
    while made := swaps.round():
        rounds += 1
        assert swap_pass(scores, fresh, k) == made and torch.equal(labels, fresh), rounds
        again = Swaps(scores, labels.clone(), k)  # the moves kept: those of the labels now
        assert torch.equal(swaps.best, again.best) and torch.equal(swaps.where, again.where), rounds
        assert all(set(swaps.members[e].tolist()) == set((labels == e).nonzero().view(-1).tolist()) for e in range(k))
    assert rounds >= 2 and swap_pass(scores, fresh, k) == 0


def test_swap_refinement_clusters_at_least_as_tightly():
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(0)).numpy()
    plain = cosine_to_centroid(x, balanced_kmeans(x, 16, seed=0, swap_rounds=0))
    refined = cosine_to_centroid(x, balanced_kmeans(x, 16, seed=0))
    assert refined > plain + 1e-3, (plain, refined)


@pytest.mark.parametrize("k", [0, 7])
def test_num_expert_must_divide_the_neurons(k):
    with pytest.raises(ValueError, match=f"num_expert {k} does not divide the 64 neurons into equal experts"):
        balanced_kmeans(np.ones((64, 4)), k)


def test_coactivation_puts_neurons_that_fire_together_in_one_expert():
    torch.manual_seed(0)
    groups = torch.arange(32) % 4  # neuron i reads direction i % 4: interleaved, so the split must find it
    w1 = torch.eye(16)[groups] + 0.05 * torch.randn(32, 16)
    b1 = torch.full((32,), -0.5)
    x = torch.eye(16)[torch.randint(0, 4, (200,))] + 0.05 * torch.randn(200, 16)
    rows = coactivation_rows(x, w1, b1)
    np.testing.assert_array_equal(rows, (x @ w1.T + b1 > 0).T.float().numpy())
    labels = balanced_kmeans(rows, 4, seed=0)
    assert all(len(set(labels[groups.numpy() == g])) == 1 for g in range(4)), labels


@pytest.mark.parametrize("threads", [1, 2])
def test_layers_cluster_in_parallel_with_the_same_result(threads):
    from pipeline.moefication.param_cluster import cluster_layers

    weights = [torch.from_numpy(planted(8, 16, 32, seed=s)[0]).float() for s in range(3)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tensors, metrics = cluster_layers(weights, 8, seed=0)
        assert torch.get_num_threads() == threads, "restored after the call"
    finally:
        torch.set_num_threads(before)
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(tensors[f"layer_{i:03d}.labels"].numpy(), balanced_kmeans(w.numpy(), 8, seed=0))
    assert metrics["layers"] == 3 and len(metrics["seconds_per_layer"]) == 3
