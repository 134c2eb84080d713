"""BMQuant: quantization-aware training on the int8 path, and the real int8 model it exports."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.models import GPTJ, get_preset
from pipeline.quant import INT8_WEIGHTS, BMQuant, Int8Linear, QATLinear, export_int8, load_int8, quantize_rows
from pipeline.train import batch_at


def test_quantize_flips_every_linear_or_the_matching_ones():
    model = GPTJ(get_preset("gpt-j-smoke"))
    names = BMQuant.quantize(model, ["*.mlp.fc_in", "*.mlp.fc_out"])
    assert names == ["transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out",
                     "transformer.h.1.mlp.fc_in", "transformer.h.1.mlp.fc_out"]
    weight = model.transformer.h[0].mlp.fc_in.weight
    assert isinstance(model.transformer.h[0].mlp.fc_in, QATLinear)
    assert not isinstance(model.transformer.h[0].attn.q_proj, QATLinear)
    assert model.transformer.h[0].mlp.fc_in.weight is weight, "the swapped layer holds the same parameters"
    assert len(BMQuant.quantize(model)) == 13
    assert all(isinstance(m, QATLinear) for m in model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("patterns, message", [
    (["transformer.ln_f"], "module 'transformer.ln_f' (LayerNorm) is not a linear layer with a weight"),
    (["transformer.h.0.attn"], "module 'transformer.h.0.attn' (Attention) is not a linear layer"),
    (["*.nothing"], "no linear layer matches ['*.nothing']"),
])
def test_quantize_refuses_what_cannot_run_in_int8(patterns, message):
    with pytest.raises(ValueError) as e:
        BMQuant.quantize(GPTJ(get_preset("gpt-j-smoke")), patterns)
    assert message in str(e.value)


def learnable_tokens():
    rng = np.random.default_rng(0)
    return np.tile(rng.integers(0, 512, size=61), 100).astype(np.uint16)


def test_qat_lowers_the_loss_and_every_quantized_weight_learns():
    torch.manual_seed(0)
    model = GPTJ(get_preset("gpt-j-smoke"))
    names = BMQuant.quantize(model)
    tokens = learnable_tokens()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        x, y = batch_at(tokens, step, 0, 8, 32, 0)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if step == 0:
            for name in names:
                grad = model.get_submodule(name).weight.grad
                assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {name}"
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < losses[0] - 1.0


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_export_is_small_and_runs_real_int8_close_to_fake_quant(tmp_path):
    torch.manual_seed(0)
    model = GPTJ(get_preset("gpt-j-tiny")).eval()
    ids = torch.randint(0, 4096, (2, 48))
    dense = logits(model, ids)
    BMQuant.quantize(model)
    fake = logits(model, ids)
    export_int8(model, tmp_path / "int8")
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path))
        sizes[dtype] = path.stat().st_size
    int8_size = (tmp_path / "int8" / INT8_WEIGHTS).stat().st_size
    assert sizes[torch.float32] / int8_size >= 3.9
    assert sizes[torch.float16] / int8_size >= 1.95

    real = load_int8(tmp_path / "int8")
    assert sum(isinstance(m, Int8Linear) for m in real.modules()) == 4 * 6 + 1
    assert real.transformer.h[0].mlp.fc_in.q_weight.dtype == torch.int8
    got = logits(real, ids)
    quant_error = (fake - dense).abs().max()
    assert 0 < (got - fake).abs().max() <= 2 * quant_error
    assert (got.argmax(-1) == fake.argmax(-1)).float().mean() > 0.9


def test_load_int8_names_a_missing_tensor(tmp_path):
    model = GPTJ(get_preset("gpt-j-smoke"))
    export_int8(model, tmp_path)
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / INT8_WEIGHTS))
    del tensors["transformer.ln_f.weight"]
    save_file(tensors, str(tmp_path / INT8_WEIGHTS))
    with pytest.raises(ValueError, match="tensor 'transformer.ln_f.weight' is missing or unexpected"):
        load_int8(tmp_path)


def test_qat_export_and_the_deployed_layer_share_one_int8_arithmetic():
    from kernels.int8 import int8_linear
    from pipeline.compressed import QLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    with torch.no_grad():
        trained = QATLinear(linear, "float")(x)
        q, s = quantize_rows(linear.weight)
        assert torch.equal(int8_linear(x, q, s.float()) + linear.bias, trained), "QAT's forward, bit for bit"
        assert torch.equal(QLinear(q, s, linear.bias.detach())(x), trained), "the exact deployed layer, bit for bit"
