"""sparse_ffn equals the dense FFN with the unchosen experts' neurons masked out."""
import pytest
import torch

from pipeline.moefication.sparse import sparse_ffn


def masked_dense(x, w1, b1, w2, b2, chosen, size):
    h = torch.relu(x @ w1.T + b1)
    mask = torch.zeros(len(x), w1.shape[0] // size).scatter_(1, chosen, 1.0)
    return (h * mask.repeat_interleave(size, dim=1)) @ w2.T + b2


def weights(d_model, num_expert, size, expert_major):
    d_ff = num_expert * size
    w1, b1 = torch.randn(d_ff, d_model) / d_model**0.5, torch.randn(d_ff)
    w2 = torch.randn(d_ff, d_model).T if expert_major else torch.randn(d_model, d_ff)
    return w1, b1, w2 / d_ff**0.5, torch.randn(d_model)


# (d_model, num_expert, size): the first two take the grouped_mm path, the odd ones the loop
@pytest.mark.parametrize("shape", [(64, 16, 8), (32, 8, 4), (24, 6, 5), (13, 5, 3)])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("expert_major", [False, True])
def test_sparse_equals_masked_dense(shape, tokens, expert_major):
    torch.manual_seed(tokens)
    d_model, num_expert, size = shape
    w = weights(d_model, num_expert, size, expert_major)
    x = torch.randn(tokens, d_model)
    for k in (1, num_expert // 3, num_expert):
        chosen = torch.rand(tokens, num_expert).topk(k, dim=1).indices
        torch.testing.assert_close(sparse_ffn(x, *w, chosen, size), masked_dense(x, *w, chosen, size))


@pytest.mark.parametrize("shape", [(64, 16, 8), (13, 5, 3)])
def test_tokens_sharing_experts(shape):
    torch.manual_seed(0)
    d_model, num_expert, size = shape
    w = weights(d_model, num_expert, size, expert_major=True)
    x = torch.randn(16, d_model)
    chosen = torch.randperm(num_expert)[:3].repeat(16, 1)  # every token picks the same 3 experts
    chosen[::2] = chosen[::2].flip(1)  # in another order for half of them
    chosen[5, 0] = (set(range(num_expert)) - set(chosen[5].tolist())).pop()  # one token differs
    torch.testing.assert_close(sparse_ffn(x, *w, chosen, size), masked_dense(x, *w, chosen, size))


@pytest.mark.parametrize("d_model, size", [(32, 4), (13, 3)])
def test_no_other_expert_is_read(d_model, size):
    torch.manual_seed(0)
    w1, b1, w2, b2 = weights(d_model, 8, size, expert_major=True)
    x, chosen = torch.randn(3, d_model), torch.tensor([[1, 6], [6, 2], [1, 2]])
    expected = masked_dense(x, w1, b1, w2, b2, chosen, size)
    unused = torch.ones(8, dtype=torch.bool)
    unused[chosen.flatten()] = False
    neurons = unused.repeat_interleave(size)
    w1[neurons], b1[neurons], w2[:, neurons] = float("nan"), float("nan"), float("nan")
    torch.testing.assert_close(sparse_ffn(x, w1, b1, w2, b2, chosen, size), expected)
