"""The configuration files, checked before any work: every file named exists, every section and
key is one the pipeline or Luigi knows (a misspelt name gets the closest known one), and every
value has its parameter's type. Each problem is one sentence naming the file."""
from __future__ import annotations

import configparser
import difflib
import os
from pathlib import Path

import luigi
import luigi.batch_notifier  # noqa: F401  Luigi's own configuration classes, registered on import
import luigi.execution_summary  # noqa: F401
import luigi.interface  # noqa: F401
import luigi.notifications  # noqa: F401
import luigi.retcodes  # noqa: F401
import luigi.scheduler  # noqa: F401
import luigi.worker  # noqa: F401
from luigi.task_register import Register

from tasks.params import Choice

CONFIG_ENV = "LUIGI_CONFIG_PATH"
# sections and keys Luigi reads without a parameter class declaring them
LUIGI_SECTIONS = {"core": {"autoload_range", "history_filename", "tmp_dir", "logging_conf_file", "no_configure_logging",
                           "rpc_log_retries", "rpc_connect_timeout", "rpc_retry_attempts", "rpc_retry_wait"},
                  "task_history": {"db_connection"}, "logging": None, "hadoop": None, "hdfs": None, "hive": None,
                  "pig": None, "spark": None, "webhdfs": None}


def check_config(classes) -> None:
    """Exit with one sentence when a configuration file is missing, holds a section or key nobody
    reads, or a value of the wrong type for a parameter of ``classes``."""
    check_paths()
    check_names()
    check_values(classes)


def check_paths() -> None:
    named = os.environ.get(CONFIG_ENV)
    if named and not Path(named).is_file():
        what = "does not exist" if not Path(named).exists() else "is not a file"
        raise SystemExit(f"error: {CONFIG_ENV} names {named!r}, which {what}; expected one configuration file "
                         f"(Luigi reads one file from it; put the settings of several in one file)")


def known_keys() -> dict[str, set[str] | None]:
    """{section: the keys read from it, or None where any key may be}: every Luigi task and
    configuration class registered (the pipeline's stages and settings, Luigi's own) and the
    sections Luigi reads directly."""
    known: dict[str, set[str] | None] = {k: (set(v) if v else None) for k, v in LUIGI_SECTIONS.items()}
    for family, cls in Register._get_reg().items():
        if not isinstance(cls, type):  # an ambiguous family name
            continue
        names = known.setdefault(family, set())
        for name, param in cls.get_params():
            names.add(name)
            path = getattr(param, "_config_path", None)
            if path:
                known.setdefault(path["section"], set()).add(_key(path["name"]))
    return known


def _key(name: str) -> str:
    return name.replace("-", "_")


def check_names() -> None:
    known = known_keys()
    for path in _read_files():
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(path)
        except configparser.Error as e:
            raise SystemExit(f"error: {path} is not a valid configuration file ({str(e).splitlines()[0]})") from None
        for section in parser.sections():
            if section not in known:
                raise SystemExit(f"error: {path} has a section [{section}] that nothing reads{_closest(section, known)}")
            keys = known[section]
            for key in parser.options(section) if keys is not None else ():
                if _key(key) not in keys:
                    raise SystemExit(f"error: {path} sets [{section}] {key}, a key that [{section}] does not have"
                                     f"{_closest(_key(key), keys)}")


def _closest(name: str, known) -> str:
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _read_files() -> list[str]:
    conf = luigi.configuration.get_config()
    return [p for p in conf._config_paths if Path(p).is_file()]


def check_values(classes) -> None:
    """A value of the wrong type for a parameter of ``classes`` (Luigi would otherwise fail later
    with a bare ``int()`` error)."""
    conf = luigi.configuration.get_config()
    for cls in classes:
        section = cls.get_task_family()
        for name, param in cls.get_params():
            if not conf.has_option(section, name):
                continue
            raw = conf.get(section, name)
            try:
                value = param.parse(raw)
                problem = param.problem(None, value) if isinstance(param, Choice) else None
                if problem:
                    raise SystemExit(f"error: {_file_setting(conf, section, name, raw)} sets [{section}] {name} = "
                                     f"{raw!r}; {problem}")
            except (ValueError, TypeError):
                kind = getattr(param, "kind", "a valid value")  # every typed parameter says its kind (tasks.params)
                raise SystemExit(f"error: {_file_setting(conf, section, name, raw)} sets [{section}] {name} = {raw!r}; "
                                 f"expected {kind}") from None


def _file_setting(conf, section: str, name: str, raw: str) -> str:
    """The configuration file that sets ``[section] name`` to ``raw`` (the last one Luigi read)."""
    for path in reversed(conf._config_paths):
        parser = configparser.ConfigParser(interpolation=None)
        if Path(path).is_file() and parser.read(path) and parser.get(section, name, fallback=None) == raw:
            return str(path)
    return "the Luigi configuration"
