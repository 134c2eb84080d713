"""Decoding with the static KV cache: every model kind the pipeline produces gives, prefilled
once and then fed one token at a time, the logits of the full-window forward."""
import copy

import pytest
import torch

from kernels import moe_gemv
from pipeline.compressed import export_compressed, load_compressed
from pipeline.decode import CachedAttention, use_c_attention
from pipeline.generate import generate
from pipeline.models import GPTJ, get_preset
from pipeline.moefication import BMMoE
from pipeline.moefication.routed import route_experts
from pipeline.prune import BMPrune

PROMPT = 9


def kinds(model, ckpt, tmp_path):
    """{kind: (model, tolerance)}: the fp32 kinds at 1e-5; int8 in QAT's arithmetic (tokens quantized one
    by one, so a token's products do not depend on its neighbours) at 1e-4."""
    torch.manual_seed(0)
    dense = GPTJ(get_preset("gpt-j-smoke")).eval()
    moe, routed, pruned = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    BMMoE.moefy(moe, 8, 3, ckpt, sparse=True)
    route_experts(routed, ckpt, 3)
    BMPrune.compute_mask(pruned, "m4n2_2d_best")
    export_compressed(model, tmp_path / "int8", None, None)
    export_compressed(model, tmp_path / "int8-moe", ckpt, 3)
    return {"dense": (dense, 1e-5), "ReLU": (model, 1e-5), "MoE (sparse path)": (moe, 1e-5),
            "MoE (routed, as trained)": (routed, 1e-5), "2:4": (pruned, 1e-5),
            "int8 (exact)": (load_compressed(tmp_path / "int8", exact=True), 1e-4),
            "int8 MoE (exact)": (load_compressed(tmp_path / "int8-moe", exact=True), 1e-4)}


def decoded(model, ids):
    model.setup_caches(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :PROMPT], input_pos=torch.arange(PROMPT))]
    for p in range(PROMPT, ids.shape[1]):
        out.append(model(ids[:, p:p + 1], input_pos=torch.tensor([p])))
    return torch.cat(out, dim=1)


def test_every_model_kind_decodes_what_the_full_forward_computes(relu_model_and_checkpoint, tmp_path):
    model, ckpt = relu_model_and_checkpoint
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    for kind, (m, tol) in kinds(model, ckpt, tmp_path).items():
        with torch.no_grad():
            full, cached = m(ids), decoded(m, ids)
        torch.testing.assert_close(cached, full, rtol=tol, atol=tol, msg=kind)
        assert generate(m, ids[0, :PROMPT].tolist(), 20) == generate(m, ids[0, :PROMPT].tolist(), 20, kv_cache=False), kind


def test_the_c_attention_step_decodes_what_the_full_forward_computes(relu_model_and_checkpoint, tmp_path,
                                                                    monkeypatch):
    """``use_c_attention``: every kind, batch 1, its one-token steps in C (``attend_one``), to the
    same tolerance; generation with the cache gives the recompute's tokens."""
    model, ckpt = relu_model_and_checkpoint
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))
    steps, real = [], moe_gemv.attend_one
    monkeypatch.setattr(moe_gemv, "attend_one", lambda *a: steps.append(a[-1]) or real(*a))
    every = kinds(model, ckpt, tmp_path)
    for kind, (m, tol) in every.items():
        with torch.no_grad():
            full = m(ids)
            assert use_c_attention(m) and isinstance(m.transformer.h[0].attn, CachedAttention), kind
            before = len(steps)
            cached = decoded(m, ids)
        torch.testing.assert_close(cached, full, rtol=tol, atol=tol, msg=kind)
        assert len(steps) - before == m.config.n_layer * (ids.shape[1] - PROMPT), kind
        assert generate(m, ids[0, :PROMPT].tolist(), 20) == generate(m, ids[0, :PROMPT].tolist(), 20, kv_cache=False), kind
    layers = every["dense"][0].config.n_layer
    assert steps[:layers + 1] == [PROMPT] * layers + [PROMPT + 1], "each layer's step at the token's position"
    with pytest.raises(ValueError, match="attend_one wants"):
        real(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(4), torch.zeros(4),
             torch.zeros(2, 16, 8), torch.zeros(2, 16, 8), 16)


def test_the_fast_int8_path_decodes_within_its_quantization_error(relu_model_and_checkpoint, tmp_path):
    """fbgemm quantizes a call's activations with one scale, so one token alone rounds differently
    from a window: the cached logits stay as close to the window's as the window's are to fp32."""
    model, ckpt = relu_model_and_checkpoint
    export_compressed(model, tmp_path / "c", ckpt, 3)
    fast = load_compressed(tmp_path / "c")
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, cached, fp32 = fast(ids), decoded(fast, ids), model(ids)
    assert (cached - full).abs().max() < 2 * (full - fp32).abs().max()


def test_decoding_past_n_positions_slides_the_window_as_the_recompute_does():
    torch.manual_seed(0)
    model = GPTJ(get_preset("gpt-j-smoke")).eval()  # n_positions 128
    stats = {}
    with_cache = generate(model, list(range(1, 101)), 60, stats=stats)
    assert with_cache == generate(model, list(range(1, 101)), 60, kv_cache=False)
    assert stats["prefill_tokens"] == 100 and stats["decode_tokens"] == 59


def test_a_cache_longer_than_the_model_takes_is_refused():
    model = GPTJ(get_preset("gpt-j-smoke"))
    with pytest.raises(ValueError, match="a KV cache of 129 positions: expected 1 to n_positions 128"):
        model.setup_caches(1, 129)


def test_q_k_v_fuse_into_one_projection_over_the_same_memory(relu_model_and_checkpoint, tmp_path):
    """Cached steps project q, k and v in one call (fp32 linears, the C int8 linears), their weights
    stacked with the parts left as views of them; the three separate projections give the same
    values, and replaced weights (``.to()``, a copy) are fused again, not served stale."""
    from pipeline.decode import fuse
    from pipeline.quant import Int8Linear

    model, ckpt = relu_model_and_checkpoint
    export_compressed(model, tmp_path / "c", ckpt, 3)
    fast = load_compressed(tmp_path / "c")
    x = torch.randn(1, model.config.n_embd, generator=torch.Generator().manual_seed(4))
    for m, tol in ((copy.deepcopy(model), 1e-6), (fast, 0.0)):
        attn = m.transformer.h[0].attn
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        with torch.no_grad():
            separate = torch.cat([p(x) for p in parts], dim=-1)
            one = fuse(parts)
            assert one is not None
            torch.testing.assert_close(one(x), separate, rtol=tol, atol=tol)
            torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), separate, rtol=0, atol=0)
        weights = [p.q_weight if isinstance(p, Int8Linear) else p.weight for p in parts]
        assert len({w.untyped_storage().data_ptr() for w in weights}) == 1, "the parts share the stacked weight"
    dense = copy.deepcopy(model)
    use_c_attention(dense)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = decoded(dense, ids)
        attn = dense.transformer.h[0].attn
        fused_before = attn._fused[0]
        with torch.no_grad():
            attn.q_proj.weight.mul_(2)  # in place: the stacked weight is the same memory
        doubled = decoded(dense, ids)
        dense.double().float()  # every weight replaced
        assert torch.equal(decoded(dense, ids), doubled)
    assert attn._fused[0] is not fused_before, "new weights, a new fused projection"
    assert not torch.equal(doubled, expected), "an in-place change reaches the fused projection"
    mixed = copy.deepcopy(model).transformer.h[0].attn
    mixed.k_proj = torch.nn.Linear(model.config.n_embd, model.config.n_embd, bias=True)
    assert fuse((mixed.q_proj, mixed.k_proj, mixed.v_proj)) is None
