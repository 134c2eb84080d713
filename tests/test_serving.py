"""The serving paths (pipeline.serving): every kernel computes the int8 product within its
quantization error, compiled equals eager (inductor runs on CPU too), the fastest measured path
is the one kept, and the served model decodes over a static KV cache what the compressed model
computes."""
import json
import math

import pytest
import torch

from kernels.sparsity import m4n2_1d
from pipeline.compressed import export_compressed, load_compressed
from pipeline.generate import generate
from pipeline.quant import quantize_rows
from pipeline.serving import (ROWS, Decoder, ServingLinear, apply_paths, choose_paths, pick_fastest, time_paths,
                              to_serving)
from pipeline import serving


def layer(n=48, k=64, seed=0, sparse=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    if sparse:  # the two largest of every four along each row
        w = w * m4n2_1d(w)
    q, s = quantize_rows(w)
    return ServingLinear(q, s, torch.randn(n, generator=g), dtype=torch.float32)


@pytest.mark.parametrize("path", ["weight_only", "w8a8", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_each_path_computes_the_int8_product_within_its_quantization_error(path, rows):
    lin = layer()
    x = torch.randn(3, rows, 64)
    exact = x.double() @ (lin.q_weight.double() * lin.scale.double()[:, None]).T + lin.bias.double()
    lin.set_paths({r: path for r in ROWS})
    y = lin(x)
    assert y.shape == (3, rows, 48) and y.dtype == torch.float32
    tol = 1e-5 if path != "w8a8" else 2e-2  # w8a8 rounds the tokens to int8 too
    assert float((y.double() - exact).abs().max() / exact.abs().max()) < tol, path


def test_compiled_paths_equal_eager():
    lin = layer()
    x = torch.randn(17, 64)
    for path in ("weight_only", "w8a8"):
        eager = serving.KERNELS[path](lin, x)
        torch.testing.assert_close(serving._compiled(path)(lin, x), eager, rtol=1e-5, atol=1e-5, msg=path)


def test_the_fastest_path_that_ran_is_picked():
    assert pick_fastest({"weight_only": 3e-3, "w8a8": 1e-3, "sparse24": math.inf, "bf16": 2e-3}) == "w8a8"
    assert pick_fastest({"weight_only": 3e-3, "w8a8": math.inf}) == "weight_only"
    with pytest.raises(RuntimeError, match="no serving path ran"):
        pick_fastest({"w8a8": math.inf})


def test_a_call_runs_the_path_of_the_smallest_timed_size_at_least_its_rows():
    lin = layer()
    lin.set_paths({1: "weight_only", 16: "bf16", 256: "w8a8"})
    assert [lin.path_for(r) for r in (1, 2, 16, 17, 256, 4096)] == ["weight_only", "bf16", "bf16", "w8a8", "w8a8",
                                                                      "w8a8"]
    assert lin.dense is not None  # bf16 runs somewhere, so its weight is kept; sparse24 nowhere
    lin.set_paths({r: "weight_only" for r in ROWS})
    assert lin.dense is None and lin.packed24 is None


def test_only_a_2_4_weight_offers_the_sparse_kernel():
    assert "sparse24" not in layer().candidates() and layer().shape_key == "48x64"
    sparse = layer(sparse=True)
    assert "sparse24" in sparse.candidates() and sparse.shape_key == "48x64/2:4"


def test_a_path_that_fails_here_times_inf_and_is_never_chosen(capsys):
    sparse = layer(sparse=True)
    seconds = time_paths(sparse, 16, dtype=torch.float32, compile=False)
    assert set(seconds) == {"weight_only", "w8a8", "sparse24", "bf16"}
    if not torch.backends.cusparselt.is_available():
        assert seconds["sparse24"] == math.inf and "sparse24" in capsys.readouterr().out
    assert pick_fastest(seconds) != "sparse24" or math.isfinite(seconds["sparse24"])
    assert all(math.isfinite(seconds[p]) for p in ("weight_only", "w8a8", "bf16"))


def test_a_wrong_kernel_is_refused_by_the_check(monkeypatch, capsys):
    monkeypatch.setitem(serving.KERNELS, "w8a8", lambda lin, x: 2 * serving.weight_only(lin, x))
    seconds = time_paths(layer(), 16, dtype=torch.float32, compile=False)
    assert seconds["w8a8"] == math.inf and "errs by" in capsys.readouterr().out


@pytest.fixture
def compressed_moe(relu_model_and_checkpoint, tmp_path):
    model, ckpt = relu_model_and_checkpoint
    export_compressed(model, tmp_path / "moe", ckpt, 3)
    return tmp_path / "moe"


def test_the_served_model_computes_the_compressed_model(compressed_moe):
    reference = load_compressed(compressed_moe, exact=True)
    served = to_serving(load_compressed(compressed_moe), "cpu", dtype=torch.float32)
    table = choose_paths(served, rows=(1, 16), compile=False)
    assert set(table["paths"]) == {"64x64", "256x64", "64x256", "512x64"} and table["device"].startswith("cpu")
    assert table["moe_gathered"] == (table["moe_decode_ms"]["gathered"] < table["moe_decode_ms"]["masked dense"])
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(3))  # beyond the sizes timed
    with torch.no_grad():
        full, served_logits = reference(ids), served(ids)
    assert float((served_logits - full).abs().max() / full.abs().max()) < 0.05
    apply_paths(served, {"paths": {k: {"1": "weight_only", "16": "weight_only"} for k in table["paths"]}})
    with torch.no_grad():  # weight-only int8 leaves the tokens in float: only QAT's token rounding differs
        assert float((served(ids) - full).abs().max() / full.abs().max()) < 0.05


def test_static_cache_decoding_equals_the_recompute(compressed_moe):
    served = to_serving(load_compressed(compressed_moe), "cpu", dtype=torch.float32)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(4))
    decoded = Decoder(served, max_len=32, compile=False).generate(prompt, 10)
    assert decoded[0].tolist() == generate(served, prompt[0].tolist(), 10, kv_cache=False)[7:]


def test_a_decode_past_the_cache_is_refused(compressed_moe):
    served = to_serving(load_compressed(compressed_moe), "cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="7 prompt tokens \\+ 30 new ones exceed the cache's 32 positions"):
        Decoder(served, max_len=32, compile=False).generate(torch.zeros(1, 7, dtype=torch.long), 30)


def test_the_compiled_decoder_decodes_what_the_eager_one_does(compressed_moe):
    served = to_serving(load_compressed(compressed_moe), "cpu", dtype=torch.float32)
    choose_paths(served, rows=(1, 16), compile=False)
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(5))
    eager = Decoder(served, max_len=24, compile=False).generate(prompt, 6)
    assert Decoder(served, max_len=24).generate(prompt, 6).tolist() == eager.tolist()


def test_the_paths_measured_at_export_are_recorded_and_loaded(compressed_moe, monkeypatch, capsys):
    fake = {1: {"weight_only": 2.0, "w8a8": 1.0, "bf16": 3.0}, 16: {"weight_only": 2.0, "w8a8": 3.0, "bf16": 1.0},
            256: {"weight_only": 1.0, "w8a8": math.inf, "bf16": 2.0}}  # a synthetic timing table
    monkeypatch.setattr(serving, "time_paths", lambda layer, rows, **kw: fake[rows])
    table = serving.record_paths(compressed_moe, "cpu")
    assert len(table["paths"]) == 4 and all(p == {"1": "w8a8", "16": "bf16", "256": "weight_only"} for p in table["paths"].values())
    config = json.loads((compressed_moe / "config.json").read_text())
    assert config["serving"][table["device"]]["paths"] == table["paths"]
    monkeypatch.setattr(serving, "time_paths", lambda *a, **kw: pytest.fail("the recorded paths are measured again"))
    model = serving.load_serving(compressed_moe, "cpu", dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, ServingLinear)]
    assert layers and all(m.paths == {1: "w8a8", 16: "bf16", 256: "weight_only"} for m in layers)
    config["serving"] = {"another GPU": table}
    (compressed_moe / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(serving, "time_paths", lambda layer, rows, **kw: fake[rows])
    serving.load_serving(compressed_moe, "cpu", dtype=torch.float32)
    assert "no serving paths recorded for cpu" in capsys.readouterr().out
