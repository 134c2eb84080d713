"""lm-evaluation-harness on the pipeline's models: a local multiple-choice task and a local
perplexity task (tests/harness/, no download), the teacher and its compressed int8 model scored by
the harness exactly as the definitions say, and the harness's perplexity equal to ours."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

lm_eval = pytest.importorskip("lm_eval", reason="the harness is the test extra's lm-eval")
pytestmark = pytest.mark.slow  # the harness indexes its thousands of task files

from pipeline import data  # noqa: E402
from pipeline.compressed import export_compressed, load_compressed  # noqa: E402
from pipeline.evaluate import perplexity  # noqa: E402
from pipeline.harness import PipelineLM, evaluate_rows  # noqa: E402
from pipeline.models import GPTJ, get_preset  # noqa: E402

TASKS = ROOT / "tests" / "harness"


@pytest.fixture
def models(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the tasks name their files from the project root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    root, files = data.stdlib_files()
    tokenizer = data.train_tokenizer(files[:30], 512)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    teacher = GPTJ(get_preset("gpt-j-smoke")).eval()
    export_compressed(teacher, tmp_path / "compressed")
    return tokenizer, teacher, tmp_path


def choice_logprob(model, tokenizer, context: str, choice: str) -> float:
    """log p(choice | context) by the definition: the choice's tokens after the context's."""
    whole, ctx = tokenizer.encode(context + choice).ids, tokenizer.encode(context).ids
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]))[0].float()
    logprobs = F.log_softmax(logits, -1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_the_harness_scores_the_teacher_and_its_compressed_model(models):
    tokenizer, teacher, tmp = models
    compressed = load_compressed(tmp / "compressed")
    got = evaluate_rows([("teacher", lambda: teacher), ("int8", lambda: compressed)], tmp / "tokenizer.json",
                        ["local_mc"], TASKS)
    docs = [json.loads(line) for line in (TASKS / "local_mc.jsonl").read_text().splitlines()]
    for name, model in (("teacher", teacher), ("int8", compressed)):
        expected = np.mean([int(np.argmax([choice_logprob(model, tokenizer, d["context"], c) for c in d["choices"]])
                                == d["answer"]) for d in docs])
        assert got[name]["local_mc"]["acc"] == pytest.approx(expected), name
    by_path = PipelineLM(path=str(tmp / "compressed"), tokenizer=str(tmp / "tokenizer.json"))
    assert by_path.max_length == teacher.config.n_positions and by_path.tok_encode("x = 1") == tokenizer.encode("x = 1").ids


def test_the_harness_perplexity_is_ours(models):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tokenizer, teacher, tmp = models
    text = json.loads((TASKS / "local_text.jsonl").read_text().splitlines()[0])["text"]
    ids = tokenizer.encode(text).ids
    # windows that split the text evenly, so that both cut it the same way
    window = max(d for d in range(1, min(teacher.config.n_positions, len(ids) // 2) + 1) if len(ids) % d == 0)
    assert len(ids) // window >= 2 or window == 1
    lm = PipelineLM(model=teacher, tokenizer=tokenizer, max_length=window)
    found = simple_evaluate(model=lm, tasks=["local_text"], task_manager=TaskManager(include_path=str(TASKS)),
                            limit=1, bootstrap_iters=0)["results"]["local_text"]
    ours = perplexity(teacher, np.array([tokenizer.token_to_id(data.EOT)] + ids), window)
    assert ours["tokens"] == len(ids)
    loglikelihood = -ours["loss"] * ours["tokens"]
    assert found["byte_perplexity,none"] == pytest.approx(math.exp(-loglikelihood / len(text.encode())), rel=1e-5)


def test_the_report_names_only_tasks_the_harness_has():
    from types import SimpleNamespace

    from tasks.params import HarnessTasks

    check = HarnessTasks().problem
    assert check(SimpleNamespace(harness_include=str(TASKS)), "local_mc, local_text") is None
    assert check(SimpleNamespace(harness_include=""), "") is None
    assert check(SimpleNamespace(harness_include=str(TASKS)), "local_mc,nosuch") == \
        "expected tasks the harness knows; it has no nosuch"


def test_the_report_table_has_a_column_per_task_and_metric():
    from pipeline.report import harness_table

    rows = [{"name": "teacher", "harness": {"local_mc": {"sample_len": 8, "acc": 0.5}}},
            {"name": "int8", "harness": {"local_mc": {"sample_len": 8, "acc": 0.375}}}]
    lines = harness_table(rows)
    assert "| model | local_mc: acc |" in lines and "| int8 | 0.375 |" in lines
    assert harness_table([{"name": "teacher"}]) == []
