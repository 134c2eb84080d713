"""The router's pieces match their definitions."""
import numpy as np
import torch

from pipeline.moefication.router import Router, coverage, expert_activation


def test_expert_mass_and_coverage_follow_their_definitions():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    b1 = torch.zeros(4)
    labels = torch.tensor([0, 1, 1, 0])
    mass = expert_activation(x, w1, b1, labels, 2)
    assert mass.tolist() == [[2.0, 0.0], [2.0, 2.0]]
    assert coverage(mass, torch.tensor([[0], [1]])).tolist() == [1.0, 0.5]
    assert coverage(torch.zeros(1, 2), torch.tensor([[0]])).tolist() == [1.0]


def test_router_starts_from_centroids_and_identity():
    centroids = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    r = Router(6, 4, centroids)
    assert torch.equal(r.a.weight, centroids) and torch.equal(r.b.weight, torch.eye(4))
    x = centroids[2] * 5
    assert r(x[None]).argmax().item() == 2, "a token along a centroid picks that expert first"
    assert np.isfinite(r(torch.zeros(1, 6)).detach().numpy()).all()
