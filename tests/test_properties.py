"""Property-based tests (hypothesis) for configuration and parameter parsing, and for the small
functions the store's guarantees rest on."""
import contextlib
import weakref

import luigi
import numpy as np
import torch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import resources
from pipeline.artifacts import StageSpec, describe_changes, save_safetensors, sha256_file
from pipeline.moefication.hidden import rank_parts

import tasks
from tasks.config import check_config

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(str), st.sampled_from(["true", "False", "1e3", " 5 "]))
TYPED = [(cls, name, param) for cls in (tasks.BaseModel, tasks.HiddenStates, tasks.Routers, tasks.FinalCompressed,
                                        tasks.ExpertClusters)
         for name, param in cls.get_params()
         if isinstance(param, (luigi.IntParameter, luigi.FloatParameter, luigi.BoolParameter, luigi.ChoiceParameter))]


@contextlib.contextmanager
def configured(section, name, raw):
    conf = luigi.configuration.get_config()
    added = not conf.has_section(section)
    if added:
        conf.add_section(section)
    old = conf.get(section, name) if conf.has_option(section, name) else None
    conf.set(section, name, raw.replace("%", "%%"))
    try:
        yield
    finally:
        if old is None:
            conf.remove_option(section, name)
        else:
            conf.set(section, name, old)
        if added:
            conf.remove_section(section)


@FAST
@given(st.sampled_from(TYPED), values)
def test_config_values_either_parse_or_get_one_sentence(typed, raw):
    cls, name, param = typed
    section = cls.get_task_family()
    with configured(section, name, raw):
        try:
            param.parse(raw)
            parses = True
        except (ValueError, TypeError):
            parses = False
        if parses:
            check_config([cls])
        else:
            with pytest.raises(SystemExit) as e:
                check_config([cls])
            message = str(e.value)
            assert message.startswith("error: the Luigi configuration sets")
            assert f"sets [{section}] {name} = {raw!r}; expected " in message
            assert "\n" not in message


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.floats(allow_nan=False),
                                                                      st.text(max_size=8), st.booleans()), max_size=6))
def test_version_ignores_key_order_and_follows_every_value(params):
    spec = StageSpec("S", params, {"U": "u"}, {"a.py": "h"})
    reordered = StageSpec("S", dict(reversed(list(params.items()))), {"U": "u"}, {"a.py": "h"})
    assert spec.version == reordered.version
    for key in params:
        changed = StageSpec("S", {**params, key: [params[key]]}, {"U": "u"}, {"a.py": "h"})
        assert changed.version != spec.version
        assert describe_changes(changed, {"params": params, "upstream": {"U": "u"},
                                          "code": {"files": {"a.py": "h"}}}) == \
            [f"parameter {key} changed from {params[key]!r} to {[params[key]]!r}"]


ENV_TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=10)


@FAST
@given(st.one_of(ENV_TEXT, st.floats().map(str)))
def test_resource_limits_parse_or_refuse_in_one_sentence(raw):
    try:
        value = float(raw)
    except ValueError:
        value = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(resources.DISK_LIMIT_ENV, raw)
        if not raw:
            assert resources._limit(resources.DISK_LIMIT_ENV) is None
        elif value is None or not value >= 0:
            with pytest.raises(resources.NotEnoughResources, match=f"{resources.DISK_LIMIT_ENV} is .*, expected a number of GiB"):
                resources._limit(resources.DISK_LIMIT_ENV)
        else:
            assert resources._limit(resources.DISK_LIMIT_ENV) == value * resources.GB


@FAST
@given(st.floats(-2, 3, allow_nan=False), st.floats(-1, 2, allow_nan=False))
def test_fraction_parameters_are_valid_or_named(heldout, topk):
    for task, name, valid in ((tasks.HiddenStates(heldout_fraction=heldout), "heldout_fraction", 0 < heldout < 1),
                              (tasks.Routers(topk_fraction=topk), "topk_fraction", 0 < topk <= 1)):
        if valid:
            task.check_params()
        else:
            with pytest.raises(ValueError, match=f"{task.get_task_family()} {name} is "):
                task.check_params()


@FAST
@given(st.integers(0, 300), st.integers(1, 5), st.integers(1, 9), st.integers(1, 40))
def test_dump_shards_cover_every_window_once_in_order(n, world, batch, part):
    parts = rank_parts(n, world, batch, part)
    joined = np.concatenate([idx for _, _, idx in parts])
    assert joined.tolist() == list(range(n))
    per_rank = {}
    for rank, k, idx in parts:
        per_rank.setdefault(rank, []).append((k, len(idx)))
    assert sorted(per_rank) == list(range(world))
    for shards in per_rank.values():
        assert [k for k, _ in shards] == list(range(len(shards)))
        assert all(size % batch == 0 for _, size in shards[:-1]), "shard boundaries fall on batch boundaries"


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6), st.text(max_size=6), min_size=1, max_size=6))
def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path_factory, metadata):
    import torch

    d = tmp_path_factory.mktemp("st")
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    save_safetensors(tensors, d / "a.safetensors", metadata=metadata)
    save_safetensors(dict(reversed(tensors.items())), d / "b.safetensors", metadata=dict(reversed(metadata.items())))
    assert sha256_file(d / "a.safetensors") == sha256_file(d / "b.safetensors")
    from safetensors import safe_open

    with safe_open(str(d / "a.safetensors"), "pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("w"), tensors["w"])


ALIVE, PEAK = weakref.WeakSet(), [0]


def tracked_model(seed: int):
    """A model the Report test counts while it lives (an evaluation job's loader)."""
    from pipeline.models import GPTJ, get_preset

    torch.manual_seed(seed)
    model = GPTJ(get_preset("gpt-j-smoke")).eval()
    ALIVE.add(model)
    PEAK[0] = max(PEAK[0], len(ALIVE))
    return model


def test_the_report_holds_at_most_two_models_at_once():
    """The teacher and one variant: each variant is freed before the next is loaded."""
    from pipeline.evaluate import job
    from pipeline.report import measure_rows

    teacher = tracked_model(0)
    rows = [("teacher", None, 1, "")] + [(f"v{i}", job(f"v{i}", tracked_model, seed=i), 1, "") for i in range(1, 5)]
    results = measure_rows(teacher, rows, {r[0]: {"perplexity": 2.0} for r in rows}, teacher.config.vocab_size,
                           rounds=1)
    assert PEAK[0] == 2 and [r["name"] for r in results] == [r[0] for r in rows]
    assert results[0]["decode_speed_ratio"] == 1.0 and all(r["prefill_16_tokens_per_s"] > 0 for r in results)
    del teacher
    PEAK[0] = 0
    from pipeline.evaluate import run_jobs  # the evaluations: the teacher held as the reference, and one variant

    tokens = np.random.default_rng(0).integers(0, 512, size=200).astype(np.uint16)
    evaluations = run_jobs([spec for _, spec, _, _ in rows[1:]], tokens, 32, 0, reference=job("teacher", tracked_model,
                                                                                               seed=0), prompts=2,
                           new_tokens=4)
    assert PEAK[0] == 2 and list(evaluations) == [r[0] for r in rows[1:]]
