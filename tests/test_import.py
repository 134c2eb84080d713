"""MODEL=gpt-j CHECKPOINT=dir: the BaseModel stage imports a Hugging Face GPT-J checkpoint."""
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from pipeline.data import stdlib_files, train_tokenizer
from pipeline.models import from_pretrained


def make_checkpoint(path: Path, vocab=512):
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                     n_inner=128, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    model = transformers.GPTJForCausalLM(config).eval()
    model.save_pretrained(path)
    _, files = stdlib_files()
    train_tokenizer(files[:20], vocab).save(str(path / "tokenizer.json"))
    return model


@pytest.mark.chain  # a chain of stages through luigi: the chain tier
def test_checkpoint_import_through_luigi(project, tmp_path):
    ckpt = tmp_path / "gptj-ckpt"
    hf = make_checkpoint(ckpt)
    args = ("--pipeline-model", "gpt-j", "--pipeline-checkpoint", str(ckpt))
    project.luigi("BaseModel", *args)
    st = project.status(*args)
    assert st["Corpus"]["state"] == st["BaseModel"]["state"] == "up-to-date"
    [version] = project.versions("BaseModel")
    art = project.artifacts / "BaseModel" / version
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["source"] == {"checkpoint": str(ckpt.resolve())}
    assert "checkpoint_sha256" in manifest["params"] and "steps" not in manifest["params"]
    assert (art / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()

    ours = from_pretrained(art)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4

    # New weights in the checkpoint: BaseModel is stale (by content hash), Corpus is not.
    weights = load_file(ckpt / "model.safetensors")
    hf.lm_head.bias.data += 1.0
    hf.save_pretrained(ckpt)
    assert not torch.equal(load_file(ckpt / "model.safetensors")["lm_head.bias"], weights["lm_head.bias"])
    st = project.status(*args)
    assert st["Corpus"]["state"] == "up-to-date"
    assert st["BaseModel"]["state"] == "stale"
    assert [r.split(" from ")[0] for r in st["BaseModel"]["reasons"]] == ["parameter checkpoint_sha256 changed"]
