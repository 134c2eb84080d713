"""The compressed model (int8 weights, routers, expert permutations): what it loads computes what
QAT trained, it is small, and pipeline.generate runs it."""
import copy
import functools
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import commands
from kernels import fbgemm, moe_gemv
from kernels.int8 import scale_and_quantize
from pipeline import sparse24
from pipeline.compressed import EXPERTS, Int8MoEFFN, QLinear, export_compressed, load_compressed
from pipeline.moefication.routed import route_experts
from pipeline.quant import BMQuant, Int8Linear, quantize_rows


def as_stored(model):
    """``model`` with what the int8 file rounds outside the GEMMs rounded alike: the embedding
    through int8 per row, norms and biases through fp16."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        q, s = quantize_rows(wte.float())
        wte.copy_(q.float() * s.float()[:, None])
        for name, p in model.named_parameters():
            if not (name.endswith(".weight") and p.dim() == 2):
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("moe", [False, True])
def test_compressed_model_computes_what_qat_trained(relu_model_and_checkpoint, tmp_path, moe):
    model, ckpt = relu_model_and_checkpoint
    with torch.no_grad():  # 2:4-style zeros must survive the export
        model.transformer.h[0].mlp.fc_in.weight[:, ::2] = 0
    out = tmp_path / "compressed"
    sizes = export_compressed(model, out, ckpt if moe else None, 3 if moe else None)
    qat = as_stored(model)
    if moe:
        route_experts(qat, ckpt, 3)
    BMQuant.quantize(qat)
    exact, fast = load_compressed(out, exact=True), load_compressed(out)
    assert isinstance(exact.transformer.h[1].attn.q_proj, QLinear)
    assert isinstance(fast.transformer.h[1].attn.q_proj, Int8Linear)
    assert isinstance(exact.transformer.h[0].mlp, Int8MoEFFN) == moe
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        expected, got = qat.eval()(ids), exact(ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got - model(ids)).abs().max() > 1e-3, "int8 is not the fp32 model"
        # where fbgemm sums exactly it runs QAT's per-token arithmetic; elsewhere it quantizes the
        # activations per call to 7 bits: an error of int8's own size
        err, int8_err = (fast(ids) - expected).abs().max(), (expected - model(ids)).abs().max()
        print(f"fbgemm vs QAT arithmetic: largest logit difference {err:.6f}; int8 vs fp32 {int8_err:.4f}")
        assert err < (1e-3 if fbgemm.exact() else 2 * int8_err)
    teacher_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert sizes["bytes"] < 0.3 * teacher_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "relu"
    if moe:
        assert config["moe"] == {"num_expert": 8, "topk": 3, "dense_above": 0.5}
        labels = load_file(str(ckpt / "clusters.safetensors"))["layer_000.labels"].long()
        perm = load_file(str(out / EXPERTS))["layer_000.permutation"].long()
        assert torch.equal(perm, torch.argsort(labels, stable=True))
        assert torch.equal(labels[perm], torch.arange(8).repeat_interleave(32)), "experts are contiguous"
        stored = load_file(str(out / "model.int8.safetensors"))  # 2:4 zeros: stored as kept values and positions
        q = sparse24.unpack(stored["transformer.h.0.mlp.fc_in.q_values"], stored["transformer.h.0.mlp.fc_in.q_index"])
        assert bool((q[model.transformer.h[0].mlp.fc_in.weight[perm] == 0] == 0).all()), "pruned weights stay 0"


def test_int8_moe_reads_only_the_chosen_experts(relu_model_and_checkpoint, tmp_path):
    """One token uses top-k experts: the FFN's GEMMs see k * size neurons, not all of them."""
    model, ckpt = relu_model_and_checkpoint
    export_compressed(model, tmp_path / "c", ckpt, 2)
    ffn = load_compressed(tmp_path / "c").transformer.h[0].mlp
    seen = []
    import pipeline.compressed as compressed

    original = compressed.int8_linear
    compressed.int8_linear = lambda x, q, s: seen.append(q.shape) or original(x, q, s)
    try:
        ffn(torch.randn(1, 1, 64))
    finally:
        compressed.int8_linear = original
    assert seen == [(64, 64), (64, 64)], seen  # (2 experts x 32 neurons, d_model) and its transpose


def test_generate_runs_the_compressed_model(relu_model_and_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model, ckpt = relu_model_and_checkpoint
    out = tmp_path / "artifact" / "compressed"
    export_compressed(model, out, ckpt, 2)
    vocab = {chr(97 + i): i for i in range(26)} | {"[UNK]": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(out / "tokenizer.json"))
    run = commands.run([sys.executable, "-m", "pipeline.generate", "--model", str(tmp_path / "artifact"),
                        "--prompt", "abc", "--max-new-tokens", "5"])
    lines = run.stdout.strip().splitlines()
    assert re.fullmatch(r"--- prefill 3 tokens at [0-9.]+ tokens/s, decode 4 tokens at [0-9.]+ tokens/s "
                        r"\(KV cache on; int8 MoE model from .*\)", lines[-1]), lines[-1]
    assert lines[0].replace(" ", "").startswith("abc") and len(lines[0].replace(" ", "")) >= 3
    bad = subprocess.run([sys.executable, "-m", "pipeline.generate", "--model", str(tmp_path / "nowhere"),
                          "--prompt", "abc"], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr


def test_int8_moe_sparse_and_dense_paths_agree(relu_model_and_checkpoint, tmp_path):
    """A call whose tokens choose most experts runs every neuron with the same per-token mask."""
    model, ckpt = relu_model_and_checkpoint
    sizes = export_compressed(model, tmp_path / "c", ckpt, 3, calibrate=True)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["moe"]["dense_above"] == sizes["dense_above"] and 3 / 8 <= sizes["dense_above"] <= 1
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        sparse = load_compressed(tmp_path / "c", exact=True, dense_above=2.0)(ids)
        dense = load_compressed(tmp_path / "c", exact=True, dense_above=0.0)(ids)
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
        fast = load_compressed(tmp_path / "c", dense_above=0.0)  # fbgemm over every neuron
        assert isinstance(fast.transformer.h[0].mlp.dense_in, Int8Linear)
        assert (fast(ids) - dense).abs().max() < 2 * (dense - model(ids)).abs().max()


def test_2_4_weights_are_stored_as_kept_values_and_positions_and_load_exactly(relu_model_and_checkpoint, tmp_path):
    from pipeline.prune import BMPrune

    model, _ = relu_model_and_checkpoint
    dense_sizes = export_compressed(model, tmp_path / "dense")
    pruned = copy.deepcopy(model)
    BMPrune.compute_mask(pruned, "m4n2_2d_greedy")
    sizes = export_compressed(pruned, tmp_path / "sparse")
    stored = load_file(str(tmp_path / "sparse" / "model.int8.safetensors"))
    # every attention and FFN matrix of both layers (q, k, v, out, fc_in, fc_out), not the embedding or head
    assert dense_sizes["sparse_matrices"] == 0 and sizes["sparse_matrices"] == 12
    assert "transformer.h.0.mlp.fc_in.q_values" in stored and "transformer.h.0.mlp.fc_in.q_weight" not in stored
    assert "lm_head.q_weight" in stored
    assert sizes["weights_bytes"] < 0.8 * dense_sizes["weights_bytes"]
    back = load_compressed(tmp_path / "sparse", exact=True)
    for name, m in back.named_modules():
        if isinstance(m, QLinear) and name.startswith("transformer.h.0.attn"):
            q, _ = quantize_rows(pruned.get_submodule(name).weight.detach().float())
            assert torch.equal(m.q_weight, q), name
    q = torch.randint(-127, 128, (4, 16), dtype=torch.int8) * torch.tensor([1, 0, 0, 1] * 4, dtype=torch.int8)
    q[0, :4] = 0  # a group with no nonzero
    assert torch.equal(sparse24.unpack(*sparse24.pack(q)), q)
    assert sparse24.pack(torch.ones(4, 16, dtype=torch.int8)) is None


def test_the_crossover_picks_the_faster_path_on_a_synthetic_timing_table():
    from pipeline.compressed import dense_from

    sparse = {10: 1.0, 20: 2.0, 30: 3.0, 40: 4.0}.__getitem__  # seconds per call, by experts used
    assert dense_from([10, 20, 30, 40], sparse, 2.5, 40) == 30 / 40  # dense from where sparse is no faster
    assert dense_from([10, 20, 30, 40], sparse, 0.5, 40) == 10 / 40  # dense always faster
    assert dense_from([10, 20, 30, 40], sparse, 9.0, 40) == 1.0  # sparse always faster


def test_the_one_token_moe_paths_equal_the_eager_definition(relu_model_and_checkpoint, tmp_path):
    """One token through the compiled weight-only gather and through fbgemm's embedding bags
    computes the eager formula, and within int8's own error the exact MoE path, which the C GEMVs
    compute bit for bit; export records
    which path measured fastest here, and loading runs it."""
    from pipeline.compressed import DECODE_PATHS, GEMV_TOKENS, LINEAR_ROWS, compiled_gathered_ffn, gathered_ffn

    model, ckpt = relu_model_and_checkpoint
    sizes = export_compressed(model, tmp_path / "c", ckpt, 3, calibrate=True)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert set(config["moe"]["decode_ms"]) == set(DECODE_PATHS)
    times = config["moe"]["decode_ms"]
    assert config["moe"]["decode_path"] == sizes["decode_path"] == min(times, key=times.get)
    assert load_compressed(tmp_path / "c").transformer.h[1].mlp.decode_path == sizes["decode_path"]
    assert config["moe"]["gemv_tokens"] == sizes["gemv_tokens"] in (0, *GEMV_TOKENS)
    assert load_compressed(tmp_path / "c").transformer.h[1].mlp.gemv_tokens == sizes["gemv_tokens"]
    rows = config["int8_gemv_rows"]
    assert rows == sizes["int8_gemv_rows"] and set(rows) == {"64x64", "512x64", "256x64", "64x256"}  # attention, head, dense FFN
    assert set(rows.values()) <= {0, *LINEAR_ROWS}
    assert sizes["int8_per_token"] is fbgemm.exact()
    assert load_compressed(tmp_path / "c").transformer.h[1].attn.q_proj.gemv_rows == rows["64x64"]
    assert load_compressed(tmp_path / "c", exact=True).lm_head.__class__ is QLinear
    ffn = load_compressed(tmp_path / "c", exact=True).transformer.h[0].mlp
    assert ffn.decode_path == "eager"
    e, size = ffn.num_expert, ffn.size
    args = (ffn.q_w1.view(e, size, -1), ffn.s_w1.view(e, size), ffn.b1.view(e, size), ffn.q_w2b.transpose(1, 2),
            ffn.s_w2.view(-1), ffn.b2)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    chosen, keep = ffn.top_experts(ffn.router(x), ffn.topk)
    with torch.no_grad():
        eager, compiled = gathered_ffn(x[0], *args, chosen[0]), compiled_gathered_ffn()(x[0], *args, chosen[0])
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        exact = ffn(x)[0]
        assert (eager - exact).abs().max() < 0.05 * exact.abs().max()
        ffn.decode_path = "gathered"
        torch.testing.assert_close(ffn(x)[0], compiled)
        ffn.decode_path = "bagged"
        torch.testing.assert_close(ffn(x)[0], eager, rtol=1e-5, atol=1e-5)
        ffn.decode_path = "gemv"  # QAT's arithmetic, as the sparse path: the same bits
        assert torch.equal(moe_gemv.route(x, ffn.router.a.weight, ffn.router.b.weight, ffn.topk), chosen)
        assert torch.equal(ffn(x), ffn._sparse(x, keep, chosen[0].sort().values))


def test_the_bagged_gemvs_read_only_the_chosen_experts():
    """``kernels.bagged`` on random int8 weights at several thread counts equals the dense product
    restricted to the chosen experts, and changing an unchosen expert's weights changes nothing."""
    from kernels import bagged

    g = torch.Generator().manual_seed(0)
    e, size, d = 8, 4, 24
    q_w1 = torch.randint(-127, 128, (e * size, d), dtype=torch.int8, generator=g)
    q_w2t = torch.randint(-127, 128, (e * size, d), dtype=torch.int8, generator=g)
    x, chosen = torch.randn(d, generator=g), torch.tensor([5, 1, 6])
    h = torch.randn(3, size, generator=g)
    want_in = q_w1.view(e, size, d)[chosen].float() @ x
    want_out = (h[..., None] * q_w2t.view(e, size, d)[chosen].float()).sum((0, 1))
    fp32_sum = {"rtol": 1e-5, "atol": 1e-5 * float(want_out.abs().max())}  # the order of the fp32 sums differs
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            torch.testing.assert_close(bagged.gemv_in(bagged.in_table(q_w1, e), x, chosen), want_in, **fp32_sum)
            torch.testing.assert_close(bagged.gemv_out(bagged.out_table(q_w2t), h, chosen), want_out, **fp32_sum)
    finally:
        torch.set_num_threads(threads)
    q_w1[:size] = q_w2t[:size] = 0  # expert 0, not chosen
    torch.testing.assert_close(bagged.gemv_in(bagged.in_table(q_w1, e), x, chosen), want_in, **fp32_sum)
    torch.testing.assert_close(bagged.gemv_out(bagged.out_table(q_w2t), h, chosen), want_out, **fp32_sum)

@pytest.mark.parametrize("e,size,d", [(8, 4, 24), (8, 32, 70), (6, 48, 100), (4, 17, 33)])
def test_the_c_path_is_the_sparse_path_bit_for_bit(e, size, d):
    """``kernels.moe_gemv`` for 1 to 9 tokens, at every vector width's tail (inputs and expert
    sizes off 16 and 32) and at several thread counts, computes ``Int8MoEFFN._sparse``'s bits, and
    an unchosen expert's weights change nothing."""
    from pipeline.moefication.router import Router

    g = torch.Generator().manual_seed(e * size * d)
    w1, w2 = torch.randn(e * size, d, generator=g), torch.randn(d, e * size, generator=g)
    b1, b2 = torch.randn(e * size, generator=g), torch.randn(d, generator=g)
    w1[:size] = w2[:, :size] = 1e3  # expert 0 is never chosen: huge weights there would show
    ffn = Int8MoEFFN(*(QLinear(*quantize_rows(w), b) for w, b in ((w1, b1), (w2, b2))), Router(d, e), 3)
    threads = torch.get_num_threads()
    try:
        for n, tokens in ((1, 1), (2, 3), (3, 5), (5, 2), (2, 9)):  # 9: experts with 4 and more tokens
            torch.set_num_threads(n)
            x = torch.randn(tokens, d, generator=g)
            chosen = torch.stack([torch.randperm(e - 1, generator=g)[:3] + 1 for _ in range(tokens)])
            keep = torch.zeros(tokens, e).scatter_(1, chosen, 1.0)
            want = ffn._sparse(x, keep, torch.unique(chosen))
            assert torch.equal(ffn._gemv(x, chosen), want), (n, tokens)
            ffn.gemv_tokens, ffn.decode_path = tokens, "gemv"  # the forward routes in C for calls up to it
            chosen, keep = ffn.top_experts(ffn.router(x), 3)
            assert torch.equal(ffn(x), ffn._sparse(x, keep, torch.unique(chosen))), (n, tokens)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("e,d,tokens", [(8, 24, 1), (32, 70, 9), (64, 4100, 3)])  # the last: threads over experts
def test_the_c_router_chooses_the_top_experts_of_the_torch_router(e, d, tokens):
    """``moe_gemv.route`` at several thread counts picks, best first, experts whose torch Router
    scores are ``top_experts``' (the sums' order can only differ in the last bits), the same
    experts for a token whatever tokens share its call, ties to the lower expert; a token of zeros
    ties every expert."""
    from pipeline.moefication.router import Router

    g = torch.Generator().manual_seed(e + d)
    router, topk = Router(d, e), max(1, e // 5)
    with torch.no_grad():
        router.a.weight.normal_(generator=g)
        router.b.weight.normal_(generator=g)
    a, b = router.a.weight.detach(), router.b.weight.detach()
    x = torch.randn(tokens, d, generator=g) * torch.logspace(-3, 3, tokens)[:, None]
    scores = router(x)
    want, _ = router_top = torch.topk(scores, topk, dim=-1)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            chosen = moe_gemv.route(x, a, b, topk)
            torch.testing.assert_close(scores.gather(1, chosen), want, rtol=1e-6, atol=1e-6)
            assert (chosen == router_top.indices).float().mean() >= 0.9
            # tokens are scored 4 at a time against each row, each sum as one token alone computes it
            assert torch.equal(chosen, torch.cat([moe_gemv.route(x[i:i + 1], a, b, topk) for i in range(tokens)]))
    finally:
        torch.set_num_threads(threads)
    twins = torch.zeros(e, e)
    twins[:, 0] = 1.0  # b copies expert 0's score to every expert: all tie
    assert moe_gemv.route(x, a, twins, topk).tolist() == [list(range(topk))] * tokens
    assert moe_gemv.route(torch.zeros(1, d), a, b, e).tolist() == [list(range(e))]
    with pytest.raises(ValueError, match=r"wants a \(8, 24\)"):
        moe_gemv.route(torch.zeros(1, 24), torch.zeros(8, 25), torch.zeros(8, 8), 2)


@pytest.mark.parametrize("n,k", [(256, 256), (70, 33), (1024, 100)])
def test_the_c_int8_linear_is_qat_arithmetic_bit_for_bit(n, k):
    """``moe_gemv.Int8Linear`` at several call sizes and thread counts, with and without a bias,
    computes ``QLinear``'s bits; ``pipeline.quant.Int8Linear`` runs it for calls up to its
    ``gemv_rows`` and fbgemm above, and a copy or a ``.to()`` computes over its own tensors."""
    g = torch.Generator().manual_seed(n + k)
    q, s = quantize_rows(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    threads = torch.get_num_threads()
    try:
        for threads_now, tokens in ((1, 1), (2, 3), (3, 17)):
            torch.set_num_threads(threads_now)
            x = torch.randn(tokens, k, generator=g)
            for b in (bias, None):
                assert torch.equal(moe_gemv.Int8Linear(q, s.float(), b)(x), QLinear(q, s, b)(x)), (tokens, b is None)
    finally:
        torch.set_num_threads(threads)
    layer, x = Int8Linear(q, s, bias), torch.randn(1, 2, k, generator=g)
    calls = []
    layer._fbgemm = lambda: calls.append(1) or fbgemm.pack(q, s)
    on_fbgemm = layer(x)
    layer.gemv_rows = 2
    assert torch.equal(layer(x), QLinear(q, s, bias)(x)) and len(calls) == 1
    layer.gemv_rows = 1
    assert torch.equal(layer(x), on_fbgemm) and len(calls) == 2
    del layer._fbgemm
    twin = copy.deepcopy(layer)
    twin.gemv_rows = 2
    twin.q_weight.zero_()
    assert torch.equal(twin(x), QLinear(twin.q_weight, s, bias)(x))  # its own weights: the bias alone
    assert not torch.equal(twin(x), QLinear(q, s, bias)(x))


def test_the_c_quantizer_is_qats_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 300, generator=g) * torch.logspace(-30, 3, 40)[:, None]
    x[3], x[4, 7], x[5, 9] = 0.0, float("nan"), float("inf")
    out = torch.full((41, 300), -1.0)
    scales = moe_gemv.quantize_rows(x, out)
    scale, q = scale_and_quantize(x, dim=1)
    assert torch.equal(out[:40], q.float()) and torch.equal(scales, scale.float().view(-1))
    assert torch.equal(out[40], torch.full((300,), -1.0)), "rows past the tokens are left as they were"
    with pytest.raises(ValueError, match="at least as many rows"):
        moe_gemv.quantize_rows(x, torch.empty(39, 300))


@pytest.mark.parametrize("c_kernels", [True, False])
def test_fbgemm_runs_qats_per_token_arithmetic_where_it_sums_exactly(monkeypatch, c_kernels):
    """``kernels.fbgemm.linear``: QLinear's result to fp32 rounding where ``exact()`` (the tokens
    quantized in C, or by torch without the C kernels), else fbgemm's per-call 7-bit product."""
    g = torch.Generator().manual_seed(4)
    q, s = quantize_rows(torch.randn(96, 200, generator=g))
    bias, x = torch.randn(96, generator=g), torch.randn(37, 200, generator=g) * torch.logspace(-2, 2, 37)[:, None]
    x[5] = 0.0
    expected = QLinear(q, s, bias)(x)
    packed = fbgemm.pack(q, s)
    if not c_kernels:
        monkeypatch.setattr(moe_gemv, "available", lambda: False)
    if fbgemm.exact():
        torch.testing.assert_close(fbgemm.linear(x, packed, bias), expected, rtol=1e-6, atol=1e-5)
        assert torch.equal(fbgemm.linear(x[5:6], packed, None), torch.zeros(1, 96)), "a zero token: zero out"
    monkeypatch.setattr(fbgemm, "exact", lambda: False)
    seven_bits = fbgemm.linear(x, packed, bias)
    assert torch.equal(seven_bits, torch.ops.quantized.linear_dynamic(x, packed, True) + bias)
    assert (seven_bits - expected)[:10].abs().max() > 10 * (expected[:10].abs().max() * 1e-6), \
        "one scale for tokens 100x apart rounds the small ones away"


def test_the_c_path_runs_up_to_the_call_size_where_it_stops_winning():
    from pipeline.compressed import gemv_up_to

    table = {2: (1.0, 3.0), 4: (2.0, 3.5), 8: (4.0, 4.0), 16: (8.0, 5.0)}.__getitem__  # (C, other) seconds
    assert gemv_up_to([2, 4, 8, 16], table) == 4  # from 8 tokens on the C path is no faster
    assert gemv_up_to([2, 4], table) == 4  # faster at every size timed
    assert gemv_up_to([8, 16], table) == 0  # never faster


def test_the_c_gemvs_build_once_per_cpu_and_say_why_when_they_cannot(tmp_path, monkeypatch):
    """The library is cached by source and CPU (a second build reuses the file); without a working
    compiler the path is unavailable with the compiler's reason, and a model that recorded it
    loads with the eager path instead."""
    from kernels import moe_gemv

    monkeypatch.setenv("PIPELINE_KERNEL_CACHE", str(tmp_path / "cache"))
    first = moe_gemv._build("cc")
    stamp = first.stat().st_mtime_ns
    assert moe_gemv._build("cc") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary left
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setattr(moe_gemv, "_library", functools.cache(moe_gemv._library.__wrapped__))
    assert not moe_gemv.available()
    assert "failed on moe_gemv.c: cc: error: no such thing" in moe_gemv.unavailable_reason()
    with pytest.raises(RuntimeError, match="not available here"):
        moe_gemv.moe_ffn(*(torch.zeros(*shape, dtype=dtype) for shape, dtype in (
            ((1, 4), torch.float32), ((4, 4), torch.int8), ((4,), torch.float32), ((4,), torch.float32),
            ((1, 4, 4), torch.int8), ((4,), torch.float32), ((4,), torch.float32), ((1, 1), torch.int64))))
    from pipeline.compressed import runnable
    assert runnable("gemv") == "eager" and runnable("bagged") == "bagged"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.name]
