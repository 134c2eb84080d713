import json
import math
import re

import pytest
import torch
import torch.nn as nn

from pipeline.models import (
    PRESETS,
    CheckpointError,
    GPTJ,
    GPTJConfig,
    from_pretrained,
    get_preset,
    load_state_dict_from_dir,
    save_pretrained,
)

import transformers  # noqa: E402  (the reference implementation; a test extra)

TOL = 1e-4


def make_hf_model(activation="gelu_new", seed=0):
    """A small random transformers GPT-J with weights large enough that attention (and so rotary) matters."""
    torch.manual_seed(seed)
    config = transformers.GPTJConfig(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128,
        activation_function=activation, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager",
    )
    model = transformers.GPTJForCausalLM(config).eval()
    scale_up_(model)
    return model


@torch.no_grad()
def scale_up_(model):
    # default init (std 0.02) gives nearly uniform attention, which would hide rotary mistakes
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
        elif ".ln_" in name or "ln_f" in name:
            p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        else:
            p.normal_(0.0, 0.1)


def random_ids(vocab=256, seed=1):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def max_diff(hf_model, our_model, vocab=256):
    ids = random_ids(vocab)
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = our_model(ids)
    assert got.shape == expected.shape == (2, 24, vocab)
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_parity_with_transformers_safetensors(tmp_path, activation):
    hf = make_hf_model(activation)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = from_pretrained(tmp_path)
    assert model.config.activation == activation
    assert max_diff(hf, model) < TOL


def test_parity_pytorch_bin_drops_hf_buffers(tmp_path):
    hf = make_hf_model()
    hf.config.save_pretrained(tmp_path)
    sd = dict(hf.state_dict())
    # old GPT-J checkpoints carry these non-parameter buffers
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert not any(k.endswith("attn.bias") for k in load_state_dict_from_dir(tmp_path))
    assert max_diff(hf, from_pretrained(tmp_path)) < TOL


def test_parity_sharded_safetensors(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert max_diff(hf, from_pretrained(tmp_path)) < TOL


def test_parity_sharded_pytorch_bin(tmp_path):
    hf = make_hf_model()
    hf.config.save_pretrained(tmp_path)
    keys = list(hf.state_dict())
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: hf.state_dict()[k] for k in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert max_diff(hf, from_pretrained(tmp_path)) < TOL


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_export_loads_in_transformers(tmp_path, activation):
    torch.manual_seed(0)
    model = GPTJ(get_preset("gpt-j-smoke").replace(activation=activation)).eval()
    scale_up_(model)
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gptj" and config["torch_dtype"] == "float32"
    hf = transformers.GPTJForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert max_diff(hf, model, vocab=model.config.vocab_size) < TOL


def test_own_format_round_trip_is_bit_identical(tmp_path):
    model = GPTJ(get_preset("gpt-j-smoke"))
    model.init_weights_(seed=3)
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = random_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_save_in_bfloat16(tmp_path):
    model = GPTJ(get_preset("gpt-j-smoke"))
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    kept = from_pretrained(tmp_path, dtype=None)
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())
    assert kept(random_ids(512)).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in from_pretrained(tmp_path).parameters())


def test_init_weights_seeded_and_rope_not_saved():
    cfg = get_preset("gpt-j-smoke")
    a, b = GPTJ(cfg).init_weights_(seed=7), GPTJ(cfg).init_weights_(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert "rope" not in a.state_dict()
    assert a.lm_head.bias.abs().max() == 0 and torch.all(a.transformer.ln_f.weight == 1)
    assert abs(a.transformer.wte.weight.std().item() - 0.02) < 0.002


def test_every_projection_is_a_plain_linear_that_bmquant_can_swap():
    from pipeline.quant import BMQuant

    model = GPTJ(get_preset("gpt-j-smoke"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 1
    assert all(type(m) is nn.Linear for m in linears), "the model file knows nothing about int8"
    assert model.lm_head.bias is not None and model.transformer.h[0].attn.q_proj.bias is None
    assert model.transformer.h[0].mlp.fc_in.bias is not None
    ids = random_ids(512)
    with torch.no_grad():
        dense = model(ids)
        BMQuant.quantize(model, ["lm_head"])
        quantized = model(ids)
    assert not torch.equal(dense, quantized), "the swapped layer runs the int8 path"
    assert (dense - quantized).abs().max() < 0.05 * dense.abs().max()


# ---------------------------------------------------------------- errors


@pytest.fixture
def good_dir(tmp_path):
    path = tmp_path / "ckpt"
    save_pretrained(GPTJ(get_preset("gpt-j-smoke")), path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def test_error_missing_dir(tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        from_pretrained(tmp_path / "nope")


def test_error_file_not_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory") as e:
        from_pretrained(tmp_path / "file")
    assert str(tmp_path / "file") in str(e.value)


def test_error_missing_config(good_dir):
    (good_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing") as e:
        from_pretrained(good_dir)
    assert str(good_dir / "config.json") in str(e.value)


def test_error_wrong_model_type(good_dir):
    edit_config(good_dir, model_type="llama")
    with pytest.raises(CheckpointError) as e:
        from_pretrained(good_dir)
    msg = str(e.value)
    assert str(good_dir / "config.json") in msg and "'model_type' is 'llama', expected 'gptj'" in msg


def test_error_missing_field(good_dir):
    edit_config(good_dir, n_head=None)
    with pytest.raises(CheckpointError, match=r"config\.json: required field 'n_head' is missing"):
        from_pretrained(good_dir)


def test_error_wrong_field_type(good_dir):
    edit_config(good_dir, n_embd="64")
    with pytest.raises(CheckpointError, match=r"config\.json: field 'n_embd' is '64', expected a positive integer"):
        from_pretrained(good_dir)


def test_error_bad_activation(good_dir):
    edit_config(good_dir, activation_function="gelu")
    with pytest.raises(CheckpointError, match=r"config\.json: field 'activation_function' is 'gelu'"):
        from_pretrained(good_dir)


def test_error_missing_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found") as e:
        from_pretrained(good_dir)
    assert "model.safetensors" in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_error_wrong_shape(good_dir):
    edit_config(good_dir, vocab_size=1024)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(good_dir)
    msg = str(e.value)
    assert str(good_dir / "model.safetensors") in msg and "'transformer.wte.weight' has shape (512, 64)" in msg
    assert "expected (1024, 64)" in msg


def test_error_missing_and_unexpected_tensor(good_dir):
    from safetensors.torch import load_file, save_file

    sd = load_file(good_dir / "model.safetensors")
    sd["transformer.h.0.attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, good_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'transformer\.h\.0\.attn\.q_proj\.bias'"):
        from_pretrained(good_dir)
    del sd["transformer.h.0.attn.q_proj.bias"], sd["lm_head.bias"]
    save_file(sd, good_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor 'lm_head\.bias'"):
        from_pretrained(good_dir)


def test_error_missing_shard(tmp_path):
    hf = make_hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"index.json: shard '{shard.name}' listed in weight_map does not exist")):
        from_pretrained(tmp_path)


# ---------------------------------------------------------------- config and presets


def test_config_hf_dict_round_trip():
    cfg = get_preset("gpt-j-tiny")
    d = cfg.to_hf_dict()
    assert d["architectures"] == ["GPTJForCausalLM"] and d["tie_word_embeddings"] is False
    assert d["bos_token_id"] == d["eos_token_id"] == 0, "the presets' end-of-text token, inside the vocabulary"
    assert GPTJConfig.from_hf_dict(d) == cfg
    d["n_inner"] = None
    assert GPTJConfig.from_hf_dict(d).n_inner == 4 * cfg.n_embd


def test_config_structural_error_names_source():
    d = get_preset("gpt-j-smoke").to_hf_dict() | {"n_head": 5}
    with pytest.raises(CheckpointError, match=r"^/x/config\.json: n_embd \(64\) is not divisible by n_head \(5\)"):
        GPTJConfig.from_hf_dict(d, source="/x/config.json")


def test_presets():
    with pytest.raises(ValueError, match=r"unknown model 'nope'; known presets: gpt-j, gpt-j-smoke, gpt-j-tiny"):
        get_preset("nope")
    gptj = get_preset("gpt-j")
    assert 6.0e9 < gptj.num_params() < 6.1e9
    assert (gptj.n_layer, gptj.n_embd, gptj.n_head, gptj.rotary_dim, gptj.n_inner, gptj.vocab_size) == (
        28, 4096, 16, 64, 16384, 50400)
    assert gptj.head_dim == 256
    get_preset("gpt-j-smoke").n_layer = 99  # a copy: the preset itself is unchanged
    assert PRESETS["gpt-j-smoke"].n_layer == 2
    for name in PRESETS:
        cfg = get_preset(name)
        if cfg.num_params() < 1e8:
            assert sum(p.numel() for p in GPTJ(cfg).parameters()) == cfg.num_params()


def test_an_exported_config_loads_in_transformers_with_its_own_token_ids(tmp_path):
    """transformers' GPTJConfig defaults its bos/eos to 50256, outside a preset's vocabulary."""
    import transformers

    from pipeline.models import GPTJ, save_pretrained

    save_pretrained(GPTJ(get_preset("gpt-j-smoke")), tmp_path)
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.bos_token_id == hf.eos_token_id == 0 < hf.vocab_size
    assert GPTJConfig.from_hf_dict({**get_preset("gpt-j").to_hf_dict(), "eos_token_id": None}).eos_token_id == 50256
