"""One default per parameter: the project's luigi.cfg. The task classes declare none, luigi.cfg
sets every parameter of every stage (and nothing else), and it is read from any working
directory, below a working directory's luigi.cfg, LUIGI_CONFIG_PATH and the command line."""
import configparser
import subprocess
import sys

import luigi

import tasks
from conftest import ROOT
from tasks.stage import PROJECT_CONFIG, pipeline_settings

CLASSES = [pipeline_settings, tasks.Corpus, tasks.BaseModel, tasks.ReluModel, tasks.HiddenStates, tasks.ExpertClusters,
           tasks.Routers, tasks.Moefied, tasks.PruningMasks, tasks.FinalCompressed, tasks.Report]


def project_config() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT_CONFIG)
    return cfg


def test_no_task_class_declares_a_default():
    for cls in CLASSES:
        for name, param in cls.get_params():
            implicit_false = isinstance(param, luigi.BoolParameter) and param._default is False
            assert param._default is luigi.parameter._no_value or implicit_false, \
                f"{cls.get_task_family()}.{name} declares default {param._default!r}; its default belongs in luigi.cfg"


def test_luigi_cfg_sets_every_parameter_and_nothing_else():
    cfg = project_config()
    for cls in CLASSES:
        section = cls.get_task_family()
        params = dict(cls.get_params())
        assert set(cfg.options(section)) == set(params), \
            f"[{section}]: missing {sorted(set(params) - set(cfg.options(section)))}, unknown " \
            f"{sorted(set(cfg.options(section)) - set(params))}"
        for name, param in params.items():
            param.parse(cfg.get(section, name))  # a value the parameter takes


def test_the_project_defaults_hold_from_any_directory(tmp_path):
    script = "import tasks; c = tasks.ExpertClusters(); print(c.method, tasks.FinalCompressed().steps)"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True).stdout.split()
    cfg = project_config()
    assert out == [cfg.get("ExpertClusters", "method"), cfg.get("FinalCompressed", "steps")]
    (tmp_path / "luigi.cfg").write_text("[ExpertClusters]\nmethod = random\n")  # a user's own file wins
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True).stdout.split()
    assert out == ["random", cfg.get("FinalCompressed", "steps")]
