"""Methods are imported only where a run asks for them, and a stage can load only those it
declared (which its version covers)."""
import pytest

from pipeline import methods
from tasks import FinalCompressed, Report
from tasks.training import rank_signal


def test_outside_a_stage_every_method_loads(monkeypatch):
    monkeypatch.delenv(methods.DECLARED_ENV, raising=False)
    assert methods.use("prune").__name__ == "pipeline.prune"


def test_inside_a_stage_an_undeclared_method_is_refused(monkeypatch):
    monkeypatch.setenv(methods.DECLARED_ENV, "prune,distill")
    assert methods.use("distill").__name__ == "pipeline.distill"
    with pytest.raises(methods.UndeclaredMethod) as e:
        methods.use("quant")
    assert "method 'quant' (pipeline.quant) runs in a stage that did not declare it (declared: prune,distill)" \
        in str(e.value)
    monkeypatch.setenv(methods.DECLARED_ENV, "")
    with pytest.raises(methods.UndeclaredMethod, match=r"declared: none"):
        methods.use("moe")


def test_unknown_methods_are_refused():
    with pytest.raises(ValueError, match="unknown method 'int4'"):
        methods.modules(["quant", "int4"])


@pytest.mark.parametrize("int8, pruning, moe, distill", [(a, b, c, d) for a in (0, 1) for b in (0, 1)
                                                         for c in (0, 1) for d in (0, 1)])
def test_a_final_run_declares_and_versions_exactly_its_toggles_methods(int8, pruning, moe, distill):
    task = FinalCompressed(int8=bool(int8), pruning=bool(pruning), moe=bool(moe), distill=bool(distill))
    on = {"int8": int8, "pruning": pruning, "moe": moe, "distill": distill}
    chosen = {"int8": {"quant", "compressed", "serving"}, "pruning": {"prune"}, "moe": {"moe"}, "distill": {"distill"}}
    expected = set().union(*(chosen[t] for t, value in on.items() if value))
    assert set(task.methods()) == expected
    code = task.spec().code
    for name, module in methods.METHODS.items():
        path = module.replace(".", "/") + ".py"
        if name in expected:
            assert path in code, f"{path} runs but is not in the version"
        else:
            assert path not in code, f"{path} does not run but is in the version"


def test_parameters_that_cannot_change_a_run_are_not_in_its_version():
    dense = FinalCompressed(int8=False, distill=False)
    assert not {"int8_grad", "kd_temp", "kd_ce_logits", "kd_loss_scale"} & set(dense.effective_params())
    assert dense.version == FinalCompressed(int8=False, distill=False, int8_grad="int8", kd_temp=4.0).version
    distilled = FinalCompressed(int8=True, distill=True)
    assert {"int8_grad", "kd_temp", "kd_ce_logits"} <= set(distilled.effective_params())
    assert distilled.version != FinalCompressed(int8=True, distill=True, int8_grad="int8").version
    assert "kd_temp" not in FinalCompressed(kd_ce_logits=0.0).effective_params()


def test_the_report_declares_what_its_int8_and_moe_rows_load():
    assert {"compressed", "moe", "quant"} <= set(Report().methods())


SUMMARY = """[default0]:RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
pipeline.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-01_22:10:01
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_22:10:00
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 4241)
  error_file: /tmp/torchelastic_x/error.json
  traceback : Traceback (most recent call last):
    RuntimeError: Connection closed by peer
============================================================"""


def test_a_killed_rank_is_named_even_when_a_survivor_failed_first():
    assert rank_signal(SUMMARY) == "SIGKILL"
    assert rank_signal(SUMMARY.replace("Signal 9 (SIGKILL)", "Signal 15 (SIGTERM)")) is None
    root_killed = SUMMARY.split("Root Cause")[0] + "Root Cause:\n  traceback : Signal 6 (SIGABRT) received"
    assert rank_signal(root_killed) == "SIGABRT"
