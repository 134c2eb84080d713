"""The training entry point as users run it: the seed's command lines under torchrun, DDP and
FSDP2 against one rank, and bad input refused before any work."""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import commands
from pipeline import train
from pipeline.models.presets import resolve_model
from pipeline.models import GPTJ, get_preset, save_pretrained

pytestmark = pytest.mark.slow  # torchrun
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    np.save(d / "train.npy", np.tile(rng.integers(0, 512, size=97), 200).astype(np.uint16))
    return d


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("smoke-model")
    save_pretrained(GPTJ(get_preset("gpt-j-smoke")), d)
    return d


def torchrun(nproc, *args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--rdzv_id=1", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", "-m", "pipeline.train", *args]
    save_dir = args[args.index("--save-dir") + 1] if "--save-dir" in args else None
    return commands.run(cmd, roots=[save_dir] if save_dir else [], check=check, timeout=300, env=ENV)


def losses(save_dir):
    return [entry[1] for entry in json.loads((save_dir / train.TRAIN_LOG).read_text())["loss"]]


def test_seed_relu_conversion_command_runs(tmp_path, corpus, smoke_dir):
    out = tmp_path / "gpt-j-relu"
    proc = torchrun(2, "--save-dir", str(out), "--model", "gpt-j-smoke-relu", "--start-lr", "1e-4",
                    "--load", str(smoke_dir), "--use-kd", "--kd-mse-last-hidden", "--kd-loss-scale", "1",
                    "--load-teacher", str(smoke_dir), "--data", str(corpus), "--steps", "4", "--batch-size", "4",
                    "--seq-len", "32")
    assert "memory plan (ddp" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "relu"
    assert len(losses(out)) == 4


def test_ddp_and_fsdp2_match_one_rank(tmp_path, corpus):
    common = ["--model", "gpt-j-smoke", "--data", str(corpus), "--steps", "5", "--batch-size", "4",
              "--seq-len", "32", "--start-lr", "3e-3", "--warmup", "1", "--precision", "fp32"]  # bf16 rounds each layout apart
    one = tmp_path / "one"
    assert train.main(["--save-dir", str(one), *common, "--grad-accum", "2"]) == 0
    for sharding in ("ddp", "fsdp"):
        out = tmp_path / sharding
        torchrun(2, "--save-dir", str(out), *common, "--sharding", sharding)
        assert json.loads((out / train.TRAIN_LOG).read_text())["sharding"] == sharding
        np.testing.assert_allclose(losses(out), losses(one), rtol=2e-5)


PROBE = """
import gc, os, sys
import torch
from pipeline import train
from pipeline.models.presets import resolve_model
gc.disable()  # only what main() itself freed counts
assert train.main(sys.argv[1:]) == 0
alive = sorted({type(o).__name__ for o in gc.get_objects() if isinstance(o, torch.nn.Module)})
sys.stdout.write(f"rank {os.environ['RANK']} alive after main: {alive}\\n")  # one write: the ranks share the pipe
sys.stdout.flush()
"""


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_rank_frees_what_it_built_on_the_group_before_it_exits(tmp_path, corpus, sharding):
    # a model left to the interpreter's final garbage collection destroys gloo's work objects from a
    # finalizing interpreter, which can abort a rank whose work is done and fail the run
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
           "--save-dir", str(tmp_path / "out"), "--model", "gpt-j-smoke", "--data", str(corpus), "--steps", "2",
           "--batch-size", "4", "--seq-len", "32", "--sharding", sharding]
    proc = commands.run(cmd, timeout=300, env={**ENV, "PYTHONPATH": str(ROOT)})
    for rank in (0, 1):
        assert f"rank {rank} alive after main: []\n" in proc.stdout, proc.stdout[-2000:]


def test_fsdp2_resume_from_sharded_checkpoints_is_bit_exact(tmp_path, corpus):
    """Each rank writes and reads its own shard (torch.distributed.checkpoint); the resumed run
    ends with the uninterrupted run's losses and weights, bit for bit."""
    from safetensors.torch import load_file

    common = ["--model", "gpt-j-smoke", "--data", str(corpus), "--steps", "6", "--batch-size", "4",
              "--seq-len", "32", "--save-interval", "2", "--sharding", "fsdp"]
    torchrun(2, "--save-dir", str(tmp_path / "a"), *common)
    torchrun(2, "--save-dir", str(tmp_path / "b"), *common, "--stop-after", "3")
    pointer = json.loads((tmp_path / "b" / "resume" / train.CHECKPOINT).read_text())
    shards = sorted(p.name for p in (tmp_path / "b" / "resume" / pointer["dir"]).glob("*.distcp"))
    assert pointer["step"] == 2 and shards == ["__0_0.distcp", "__1_0.distcp"], shards
    proc = torchrun(2, "--save-dir", str(tmp_path / "b"), *common)
    assert "resuming from step 2" in proc.stdout
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_main(*args):
    with pytest.raises(SystemExit) as e:
        train.main(list(args))
    assert e.value.code == 2
    return str(e.value)


def test_bad_input_is_refused_before_any_work(tmp_path, corpus, smoke_dir, monkeypatch):
    base = ["--save-dir", str(tmp_path / "out"), "--data", str(corpus), "--steps", "2", "--batch-size", "4"]
    assert "--load /nope does not exist" in run_main(*base, "--model", "gpt-j-smoke", "--load", "/nope")

    wrong = tmp_path / "wrong.safetensors"
    tiny = GPTJ(get_preset("gpt-j-smoke").replace(n_embd=32, rotary_dim=4))
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(wrong))
    assert "wrong architecture" in run_main(*base, "--model", "gpt-j-smoke", "--load", str(wrong))

    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"model": object()}))
    message = run_main(*base, "--model", "gpt-j-smoke", "--load", str(evil))
    assert "is not a weights-only checkpoint; refusing to unpickle it" in message

    other_vocab = tmp_path / "teacher"
    save_pretrained(GPTJ(get_preset("gpt-j-smoke").replace(vocab_size=600)), other_vocab)
    message = run_main(*base, "--model", "gpt-j-smoke", "--use-kd", "--load-teacher", str(other_vocab))
    assert "the teacher's vocabulary (600 tokens) differs from the student's (512)" in message

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "--batch-size 4 must be a positive multiple of the world size 3" in run_main(*base, "--model", "gpt-j-smoke")
    monkeypatch.delenv("WORLD_SIZE")

    assert "--save-hidden arrives with the HiddenStates stage" in run_main(*base, "--model", "gpt-j-smoke",
                                                                           "--save-hidden")
    assert "--prune-func: unknown prune function 'm4n2_9d'" in run_main(*base, "--model", "gpt-j-smoke",
                                                                        "--use-pruning", "--prune-func", "m4n2_9d")
    assert "--model 'gpt-k' is not a known model" in run_main(*base, "--model", "gpt-k")
    assert "--moe needs --moe-topk" in run_main(*base, "--model", "gpt-j-smoke-relu", "--moe", str(tmp_path))
    message = run_main(*base, "--model", "gpt-j-smoke-relu", "--moe", str(tmp_path / "nope"), "--moe-topk", "2")
    assert f"--moe: {tmp_path / 'nope' / 'clusters.safetensors'} is missing" in message
    message = run_main(*base, "--model", "gpt-j-smoke", "--memory-limit-gb", "0.001")
    assert "gpt-j-smoke does not fit: ddp over 1 rank(s) needs" in message and "GiB available" in message
    assert not (tmp_path / "out").exists(), "nothing was written"


def test_seed_model_names():
    assert resolve_model("gpt-j-full")[0].n_layer == 28
    config, int8 = resolve_model("gpt-j-full-relu-int8")
    assert config.activation == "relu" and int8
    assert resolve_model("gpt-j")[0].n_layer == 14 and resolve_model("gpt-j-int8")[1]
    assert resolve_model("gpt-j-tiny-relu")[0].n_embd == 256


def test_memory_plan_for_gpt_j_on_eight_gpus():
    full = get_preset("gpt-j")
    ddp = train.memory.plan(full, 8, "ddp", 1, 2048, 2, 80 * train.memory.GB, full)
    fsdp = train.memory.plan(full, 8, "fsdp", 1, 2048, 2, 80 * train.memory.GB, full)
    assert ddp.total > ddp.available, "replicated AdamW state of 6B parameters (96 GB) does not fit 80 GB"
    assert fsdp.total < fsdp.available
    assert fsdp.optimizer == pytest.approx(8 * full.num_params() / 8)
