"""Non-finite numbers stop the work where they appear: a stage's NaN metric fails it with nothing
published, and a training step with a NaN or infinite loss or gradient norm stops the run before
the update, naming the step, the value and the resume point that stays."""
import json
import math

import pytest

from pipeline.artifacts import StageSpec, Store, non_finite
from pipeline.train import NonFiniteTraining, check_finite


def test_a_nan_metric_fails_the_stage_and_publishes_nothing(tmp_path):
    store = Store(tmp_path / "store")
    spec = StageSpec("BaseModel", {"n": 1}, {}, {})
    with pytest.raises(ValueError, match=r"BaseModel: metrics\.valid_perplexity is nan, not a finite number"):
        with store.publishing(spec) as build:
            (build.path / "model.txt").write_text("x")
            build.metrics.update(valid_loss=1.5, valid_perplexity=float("nan"))
    assert store.get("BaseModel", spec.version) is None
    assert not list((tmp_path / "store" / "BaseModel").glob(".scratch-*")), "no half-written build is left"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_finds_the_first_bad_number_by_its_key(value):
    assert non_finite({"a": 1.0, "b": [0.5, {"c": value}]}) == ("b.1.c", value)
    assert non_finite({"a": [1.0, 2], "b": "nan"}) is None  # a string is not a number


def test_manifests_are_written_as_strict_json(tmp_path):
    store = Store(tmp_path / "store")
    spec = StageSpec("Corpus", {}, {}, {})
    with store.publishing(spec) as build:
        (build.path / "x.txt").write_text("x")
        build.metrics["loss"] = 0.25
    text = store.manifest_path("Corpus", spec.version).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a manifest"))


def test_a_non_finite_step_names_the_step_the_value_and_the_resume_point_kept(tmp_path):
    resume = tmp_path / "resume"
    (resume / "step-0000040").mkdir(parents=True)
    check_finite(41, 2.5, 0.7, resume)  # finite: nothing happens
    check_finite(41, 2.5, None, resume)  # fp16: the loss scaler judges the gradients
    with pytest.raises(NonFiniteTraining) as stopped:
        check_finite(41, 2.5, math.inf, resume)
    message = str(stopped.value)
    assert message.startswith("error: training stopped at step 41: its gradient norm is inf, not a finite number")
    assert f"the last resume point, {resume / 'step-0000040'}, is kept" in message and "\n" not in message
    assert stopped.value.code == 1
    with pytest.raises(NonFiniteTraining, match="at step 3: its loss is nan.*no resume point was saved"):
        check_finite(3, math.nan, 1.0, tmp_path / "empty")
