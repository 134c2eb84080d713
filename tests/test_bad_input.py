"""The bad-input catalogue: every row of docs/bad-inputs.md's table is run here, and the exact message
it shows must appear on stderr with a non-zero exit, with nothing published.

In the table, ``<dir>`` stands for the directory the inputs lie in, ``<store>`` for the artifact
store, ``<version>`` for a stage version and ``<n>`` for a number."""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SMOKE_CFG

CATALOGUE = ROOT / "docs" / "bad-inputs.md"
BEGIN, END = "<!-- bad-inputs -->", "<!-- /bad-inputs -->"


def catalogue() -> dict[str, tuple[str, str, str]]:
    """{id: (area, bad input, message)} from the catalogue's table."""
    text = CATALOGUE.read_text()
    rows = {}
    for line in text[text.index(BEGIN):text.index(END)].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows[cells[0]] = (cells[1], cells[2], cells[3].strip("`").replace("\\|", "|"))
    return rows


def expected(message: str, d: Path, store: Path) -> re.Pattern:
    pattern = re.escape(message).replace(re.escape("<dir>"), re.escape(str(d))) \
        .replace(re.escape("<store>"), re.escape(str(store))).replace(re.escape("<n>"), r"[0-9.]+") \
        .replace(re.escape("<version>"), "[0-9a-f]{16}")
    return re.compile(pattern)


# ---------------------------------------------------------------------------------------------
# The inputs, by catalogue number. Each returns the finished process.

def luigi(*args):
    return lambda p, d: p.luigi(*args, check=False)


def config(text, stage="BaseModel"):
    def run(p, d):
        (d / "bad.cfg").write_text(text)
        p.env["LUIGI_CONFIG_PATH"] = str(d / "bad.cfg")
        return p.luigi(stage, check=False)
    return run


def checkpoint(make):
    def run(p, d):
        path = make(d)
        return p.luigi("BaseModel", "--pipeline-model", "gpt-j", "--pipeline-checkpoint", str(path), check=False)
    return run


def hf_checkpoint(d: Path, keep_tokenizer=True) -> Path:
    """A real GPT-J checkpoint directory, as transformers writes it (tiny)."""
    import transformers

    cfg = transformers.GPTJConfig(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)
    path = d / "ckpt"
    transformers.GPTJForCausalLM(cfg).save_pretrained(path)
    if keep_tokenizer:
        shutil.copy(tokenizer_file(d), path / "tokenizer.json")
    return path


def tokenizer_file(d: Path) -> Path:
    from pipeline import data

    files = [d / f"t{i}.txt" for i in range(2)]
    for i, f in enumerate(files):
        f.write_text(f"def f{i}(x):\n    return x + {i}\n" * 50)
    data.train_tokenizer(files, 300, 0).save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def corpus(d: Path, n_files=3) -> str:
    for i in range(n_files):
        write(d / "corpus" / f"f{i}.py", f"x_{i} = {i}\n" * 2000)
    return str(d / "corpus" / "*.py")


def module(name, *args):
    return lambda p, d: p.run("-m", name, *[a.format(d=d) for a in args], check=False)


def fake_corpus_artifact(d: Path) -> Path:
    out = d / "corpus_artifact"
    out.mkdir()
    np.save(out / "train.npy", np.arange(300, dtype=np.uint16))
    np.save(out / "valid.npy", np.arange(100, dtype=np.uint16))
    return out


def published_corpus(p, d):
    """A real Corpus on a small text set, built once per session and copied into this project's
    store; returns its artifact directory and the files pattern."""
    shared = d.parent / "bad-input-corpus"
    pattern = str(shared / "corpus" / "*.py")
    if not (shared / "store").is_dir():
        corpus(shared)
        p.luigi("Corpus", "--Corpus-files", pattern)
        shutil.copytree(p.artifacts, shared / "store")
    else:
        shutil.copytree(shared / "store", p.artifacts)
    [manifest] = p.artifacts.glob("Corpus/*/manifest.json")
    return manifest.parent, pattern


def status_after(damage):
    def run(p, d):
        artifact, pattern = published_corpus(p, d)
        damage(artifact)
        return p.run("-m", "tasks.status", "--Corpus-files", pattern, check=False)
    return run


def flip_byte(path: Path, at: int = -1):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def generate_on_damaged_artifact(p, d):
    import torch

    from pipeline.artifacts import StageSpec, Store
    from pipeline.models import GPTJ, get_preset, save_pretrained

    store = Store(d / "store")
    spec = StageSpec("FinalCompressed", {}, {}, {})
    with store.publishing(spec) as build:
        torch.manual_seed(0)
        save_pretrained(GPTJ(get_preset("gpt-j-smoke")), build.path)
        shutil.copy(tokenizer_file(d), build.path / "tokenizer.json")
    artifact = store.version_dir("FinalCompressed", spec.version)
    flip_byte(artifact / "model.safetensors", 1000)
    return p.run("-m", "pipeline.generate", "--model", str(artifact), "--prompt", "def", check=False)


def environment(name, value, *args):
    def run(p, d):
        p.env[name] = value
        return p.luigi(*args, check=False)
    return run


def missing_hidden_states(p, d):
    write(d / "res" / "clusters.safetensors", "")
    return p.run("-m", "pipeline.moefication.mlp_select", "--model_path", str(d / "relu"), "--res_path",
                 str(d / "res"), "--num-layer", "2", "--num-expert", "8", check=False)


def corpus_files(name: str, texts: list[bytes]):
    """Corpus files ``<dir>/<name>/f<i>.py`` holding ``texts``; the run builds a Corpus on them."""
    def run(p, d):
        for i, text in enumerate(texts):
            (d / name).mkdir(exist_ok=True)
            (d / name / f"f{i}.py").write_bytes(text)
        return p.luigi("Corpus", "--Corpus-files", str(d / name / "*.py"), check=False)
    return run


def valid_split(d: Path, text: str) -> str:
    """Three corpus files, the one the split holds out holding ``text``; returns the pattern."""
    from pipeline import data

    pattern = corpus(d)
    root, files = data.discover(pattern)
    [held_out] = data.split(root, files, 0.05)[1]
    held_out.write_text(text)
    return pattern


def after_corpus(pattern_of, *args):
    """Build a Corpus, then run ``args`` on it: refused while the graph is computed."""
    def run(p, d):
        pattern = pattern_of(p, d)
        p.luigi("Corpus", "--Corpus-files", pattern)
        return p.luigi(*args, "--Corpus-files", pattern, check=False)
    return run


def small_vocabulary_model(d: Path) -> Path:
    import transformers

    cfg = transformers.GPTJConfig(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=8)
    transformers.GPTJForCausalLM(cfg).save_pretrained(d / "small")
    tokenizer_file(d)
    return d / "small"


def store_is_a_file(p, d):
    p.env["PIPELINE_ARTIFACTS"] = str(write(d / "file", "x"))
    return p.run("-m", "tasks.status", check=False)


def edited_checkpoint(edit):
    """A real GPT-J checkpoint whose ``model.safetensors`` tensors ``edit`` changes (a dict of
    name to tensor, edited in place) before they are written back."""
    def make(d: Path) -> Path:
        from safetensors.torch import load_file, save_file

        path = hf_checkpoint(d)
        tensors = load_file(path / "model.safetensors")
        edit(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    return make


def nan_weight(tensors):
    tensors["transformer.h.1.mlp.fc_in.weight"][3, 5] = float("nan")


def truncated_checkpoint(d: Path) -> Path:
    path = hf_checkpoint(d)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return path


def sharded_checkpoint_missing_a_shard(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = hf_checkpoint(d)
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    save_file({n: tensors[n] for n in names[::2]}, path / "model-00001-of-00002.safetensors")
    weight_map = {n: shard for shard, ns in shards.items() for n in ns}
    write(path / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def nan_training_weights(p, d):
    import torch
    from safetensors.torch import save_file

    from pipeline.models import GPTJ, get_preset

    torch.manual_seed(0)
    state = GPTJ(get_preset("gpt-j-smoke")).state_dict()
    state["transformer.h.0.mlp.fc_in.weight"][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "nan.safetensors"))
    return p.run("-m", "pipeline.train", "--save-dir", str(d / "out"), "--model", "gpt-j-smoke", "--data",
                 str(d / "corpus_artifact"), "--load", str(d / "nan.safetensors"), "--steps", "3", "--seq-len", "16",
                 "--batch-size", "2", check=False)


def config_path(value):
    def run(p, d):
        p.env["LUIGI_CONFIG_PATH"] = value.format(d=d)
        return p.luigi("BaseModel", check=False)
    return run


def plan_check(make):
    def run(p, d):
        path = make(d)
        return p.run("-m", "tasks.plan", "--check", "--target", "Report", "--pipeline-model", "gpt-j",
                     "--pipeline-checkpoint", str(path), check=False)
    return run


CASES = {
    # command line: luigi parameters
    "1": luigi("BaseModel", "--pipeline-model", "gpt-k"),
    "2": luigi("BaseModel", "--BaseModel-steps", "0"),
    "3": luigi("HiddenStates", "--HiddenStates-heldout-fraction", "1.5"),
    "4": luigi("Routers", "--Routers-topk-fraction", "0"),
    "5": luigi("ExpertClusters", "--ExpertClusters-num-expert", "7"),
    "6": luigi("Corpus", "--Corpus-valid-fraction", "1"),
    "7": luigi("HiddenStates", "--HiddenStates-part-tokens", "16"),
    "8": luigi("Moefied", "--Moefied-eval-tokens", "10"),
    "9": module("tasks.status", "--pipeline-model", "gpt-k"),
    # command line: the tools
    "10": module("pipeline.train", "--save-dir", "{d}/out", "--model", "gpt-k", "--data", "{d}/corpus_artifact"),
    "11": module("pipeline.train", "--save-dir", "{d}/out", "--model", "gpt-j-smoke", "--data", "{d}/corpus_artifact",
                 "--use-kd"),
    "12": module("pipeline.train", "--save-dir", "{d}/out", "--model", "gpt-j-smoke", "--data", "{d}"),
    "13": module("pipeline.generate", "--model", "{d}/nothing", "--prompt", "hi"),
    "14": module("pipeline.generate", "--model", "{d}", "--prompt", "hi", "--max-new-tokens", "0"),
    # luigi.cfg
    "15": config("[BaseModel]\nsteps = many\n"),
    "16": config("[FinalCompressed]\nint8 = maybe\n"),
    "17": config("[ExpertClusters]\nmethod = kmeans\n"),
    "18": config("[pipeline]\nnproc_per_node = two\n"),
    "19": config("[Routers]\nlr = fast\n"),
    # checkpoints
    "20": checkpoint(lambda d: d / "nope"),
    "21": checkpoint(lambda d: write(d / "file", "x")),
    "22": checkpoint(lambda d: (d / "empty").mkdir() or d / "empty"),
    "23": checkpoint(lambda d: write(d / "llama" / "config.json", json.dumps({"model_type": "llama"})).parent),
    "24": checkpoint(lambda d: write(d / "broken" / "config.json", "{model_type: gptj").parent),
    "25": checkpoint(lambda d: (hf_checkpoint(d) / "model.safetensors").unlink() or d / "ckpt"),
    "26": checkpoint(lambda d: (hf_checkpoint(d, keep_tokenizer=False))),
    # corpora
    "27": luigi("Corpus", "--Corpus-files", "/nonexistent/*.txt"),
    "28": lambda p, d: p.luigi("Corpus", "--Corpus-files", corpus(d, n_files=1), check=False),
    "29": module("pipeline.moefication.hidden", "--model", "{d}", "--data", "{d}/corpus_artifact", "--out",
                 "{d}/out", "--token-budget", "100000"),
    # artifacts
    "30": status_after(lambda a: flip_byte(a / "train.npy")),
    "31": status_after(lambda a: (a / "valid.npy").write_bytes((a / "valid.npy").read_bytes()[:-10])),
    "32": status_after(lambda a: (a / "manifest.json").write_text("{")),
    "33": generate_on_damaged_artifact,
    "34": missing_hidden_states,
    # environment: disk and memory
    "35": environment("PIPELINE_DISK_LIMIT_GB", "0.0001", "Corpus"),
    "36": environment("PIPELINE_MEMORY_LIMIT_GB", "0", "Corpus"),
    "37": environment("PIPELINE_DISK_LIMIT_GB", "lots", "Corpus"),
    # torchrun settings a run could not start with
    "38": luigi("BaseModel", "--pipeline-nnodes", "2"),
    "39": luigi("BaseModel", "--pipeline-nproc-per-node", "0"),
    "40": luigi("BaseModel", "--pipeline-nnodes", "0"),
    # corpora that are not text, or too little of it
    "41": lambda p, d: p.luigi("Corpus", "--Corpus-files", valid_split(d, ""), check=False),
    "42": corpus_files("empty", [b"", b""]),
    "43": corpus_files("binary", [Path(sys.executable).read_bytes()[:20000]] * 2),
    "44": corpus_files("latin1", [b"caf\xe9 = 1\n" * 10] * 2),
    "45": luigi("Corpus", "--Corpus-max-bytes", "-1"),
    "46": after_corpus(lambda p, d: valid_split(d, "x\n"), "BaseModel"),
    "47": after_corpus(lambda p, d: published_corpus(p, d)[1], "HiddenStates", "--HiddenStates-token-budget",
                       "1000000000000"),
    # shapes
    "48": luigi("BaseModel", "--BaseModel-seq-len", "4096"),
    "49": luigi("BaseModel", "--BaseModel-batch-size", "3", "--pipeline-nproc-per-node", "2"),
    "50": luigi("BaseModel", "--BaseModel-eval-tokens", "10"),
    # counts
    "51": luigi("Routers", "--Routers-epochs", "0"),
    "52": luigi("Routers", "--Routers-batch-size", "0"),
    "53": luigi("ExpertClusters", "--ExpertClusters-iterations", "0"),
    "54": luigi("ExpertClusters", "--ExpertClusters-method", "coactivation", "--ExpertClusters-sample-tokens", "0"),
    "55": luigi("HiddenStates", "--HiddenStates-batch-size", "0"),
    # choices on the command line
    "56": luigi("ExpertClusters", "--ExpertClusters-method", "kmeans"),
    "57": luigi("PruningMasks", "--PruningMasks-prune-func", "foo"),
    "58": luigi("FinalCompressed", "--FinalCompressed-int8-grad", "foo"),
    # the tools
    "59": lambda p, d: p.run("-m", "pipeline.generate", "--model", str(small_vocabulary_model(d)), "--tokenizer",
                             str(d / "tokenizer.json"), "--prompt", "def", check=False),
    "60": module("pipeline.generate", "--model", "{d}", "--prompt", "hi", "--temperature", "-1"),
    "61": module("pipeline.generate", "--model", "{d}", "--prompt", "hi", "--threads", "-3"),
    "62": module("pipeline.memory", "--model", "nope"),
    "63": module("pipeline.memory", "--model", "gpt-j-tiny", "--world-size", "0"),
    "64": module("pipeline.moefication.hidden", "--model", "/nonexistent", "--data", "{d}", "--out", "{d}/out"),
    "65": store_is_a_file,
    "66": luigi("Moefied", "--pipeline-model", "gpt-j"),
    "67": luigi("Report", "--Report-harness-tasks", "nosuch_task"),
    "68": luigi("Report", "--Report-harness-tasks", "local_mc", "--Report-harness-include", "/nonexistent"),
    "69": luigi("BaseModel", "--pipeline-precision", "fp8"),
    "70": module("pipeline.generate", "--model", "{d}", "--prompt", "hi", "--kv-cache", "maybe"),
    # non-finite numbers
    "71": checkpoint(edited_checkpoint(nan_weight)),
    "72": nan_training_weights,
    # configuration files and command-line types, before any work
    "73": config_path("{d}/missing.cfg"),
    "74": config_path("{d}/a.cfg:{d}/b.cfg"),
    "75": config("[BaseModel]\nstep = 5\n"),
    "76": config("[BaseModle]\nsteps = 5\n"),
    "77": luigi("BaseModel", "--BaseModel-steps", "1.5"),
    "78": luigi("BaseModel", "--BaseModel-start-lr", "abc"),
    "79": luigi("FinalCompressed", "--FinalCompressed-int8", "maybe"),
    "80": luigi("BaseModel", "--pipeline-nproc-per-node", "two"),
    "81": module("tasks.status", "--BaseModel-steps", "1.5"),
    "82": module("tasks.plan", "--ReluModel-kd-temp", "nan"),
    # inputs that depend on the corpus or the checkpoint, refused before any stage builds
    "83": luigi("HiddenStates", "--HiddenStates-token-budget", "100000000"),
    "84": luigi("HiddenStates", "--HiddenStates-heldout-fraction", "0"),
    "85": luigi("HiddenStates", "--HiddenStates-heldout-fraction", "0.001"),
    "86": lambda p, d: p.luigi("HiddenStates", "--HiddenStates-token-budget", "300000", check=False),
    "87": checkpoint(edited_checkpoint(lambda t: t.pop("transformer.h.1.attn.q_proj.weight"))),
    "88": checkpoint(edited_checkpoint(lambda t: t.update({"transformer.ln_f.weight": t["transformer.ln_f.weight"][:32]}))),
    "89": checkpoint(truncated_checkpoint),
    "90": checkpoint(sharded_checkpoint_missing_a_shard),
    "91": plan_check(edited_checkpoint(lambda t: t.pop("transformer.h.1.attn.q_proj.weight"))),
}
SETUP = {"10": fake_corpus_artifact, "11": fake_corpus_artifact, "29": fake_corpus_artifact,
         "72": fake_corpus_artifact}
# built on purpose before the refused run, or the Corpus that a check needs built first
PUBLISHED = {"46": {"Corpus"}, "47": {"Corpus"}, "71": {"Corpus"}, "86": {"Corpus"}}


def test_the_catalogue_has_a_test_for_every_row_and_no_more():
    rows = catalogue()
    assert len(rows) >= 25
    assert set(rows) == set(CASES)
    areas = {area for area, _, _ in rows.values()}
    assert {"command line", "luigi.cfg", "checkpoint", "corpus", "artifact"} <= areas


@pytest.mark.parametrize("number", sorted(CASES, key=int))
def test_bad_input_gets_its_catalogued_message(project, tmp_path, number):
    area, what, message = catalogue()[number]
    if number in SETUP:
        SETUP[number](tmp_path)
    proc = CASES[number](project, tmp_path)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0, f"#{number} ({what}) exited 0:\n{out[-2000:]}"
    assert expected(message, tmp_path, project.artifacts).search(out), f"#{number} ({what}): expected\n  {message}\ngot:\n{out[-2000:]}"
    assert "Traceback" not in out, f"#{number}: a traceback reached the user"
    published = {m.parent.parent.name for m in project.artifacts.glob("*/*/manifest.json")}
    assert published <= PUBLISHED.get(number, set()) or area == "artifact", f"nothing is published: {published}"


if __name__ == "__main__":  # print each case's message, to write the table from
    import os
    import tempfile

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_project

    for number in sys.argv[1:] or sorted(CASES, key=int):
        d = Path(tempfile.mkdtemp())
        proj = make_project(d / "project")
        proj.env["LUIGI_CONFIG_PATH"] = str(SMOKE_CFG)
        if number in SETUP:
            SETUP[number](d)
        proc = CASES[number](proj, d)
        out = proc.stderr + proc.stdout
        lines = [ln for ln in out.splitlines() if ln.lstrip(" -").startswith(("error", "warning", "/"))] or out.splitlines()[-2:]
        print(number, proc.returncode, " || ".join(lines).replace(str(d), "<dir>"), flush=True)
        os.system(f"rm -rf {d}")
