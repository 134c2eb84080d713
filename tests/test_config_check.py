"""Every setting is checked before work: each typed parameter refuses a wrongly typed command-line
value by name, and the configuration check knows every section and key the pipeline's own
luigi.cfg sets while refusing near-misses with the closest name."""
import luigi
import pytest

import tasks
from tasks import config
from tasks.params import Typed


def all_parameters():
    classes = [getattr(tasks, n) for n in tasks.__all__]
    for cls in classes:
        if isinstance(cls, type) and issubclass(cls, (luigi.Task, luigi.Config)):
            for name, param in cls.get_params():
                yield cls.get_task_family(), name, param


def test_every_int_float_and_bool_parameter_checks_its_command_line_type():
    plain = (luigi.IntParameter, luigi.FloatParameter, luigi.BoolParameter)
    unchecked = [f"{family}.{name}" for family, name, param in all_parameters()
                 if isinstance(param, plain) and not isinstance(param, Typed)]
    assert not unchecked, f"parameters whose bad command-line value would reach Luigi's parser: {unchecked}"


def test_the_projects_own_configuration_passes_and_names_are_what_luigi_reads():
    config.check_names()  # luigi.cfg: [core], [worker], [retcode] and every stage's section
    known = config.known_keys()
    assert {"steps", "start_lr", "seed"} <= known["BaseModel"] and "omp_spincount" in known["pipeline"]
    assert {"local_scheduler", "no_lock", "autoload_range"} <= known["core"]


@pytest.mark.parametrize("text, message", [
    ("[ReluModel]\nkd_ce_logit = 2\n", "sets [ReluModel] kd_ce_logit, a key that [ReluModel] does not have "
                                        "(did you mean kd_ce_logits?)"),
    ("[worker]\nkeep-alive = true\n[Router]\nlr = 1\n", "has a section [Router] that nothing reads "
                                                         "(did you mean Routers?)"),
    ("[Pipeline]\nmodel = x\n", "has a section [Pipeline] that nothing reads (did you mean pipeline?)"),
    ("[core]\nlocal-scheduler = true\nno_lock = true\n[FinalCompressed]\nint8 = false\n", None),
    ("[BaseModel\nsteps = 1\n", "is not a valid configuration file"),
])
def test_a_misspelt_name_is_refused_naming_the_file_and_the_closest_name(tmp_path, monkeypatch, text, message):
    path = tmp_path / "user.cfg"
    path.write_text(text)
    monkeypatch.setattr(config, "_read_files", lambda: [str(path)])
    if message is None:
        config.check_names()
        return
    with pytest.raises(SystemExit) as refused:
        config.check_names()
    assert str(refused.value).startswith(f"error: {path} ") and message in str(refused.value)
