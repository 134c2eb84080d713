"""Stage parameters that say which values they accept. A stage checks every one of them before it
computes its version (``Stage.check_params``), so that a bad value from the command line or a
configuration file is refused in one sentence before any work, whichever stage asked for it.

Luigi's own ``ChoiceParameter`` refuses a bad value while it parses the command line, where
Luigi only reports "Uncaught exception"; ``Choice`` leaves the refusal to the stage."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import luigi


class Typed:
    """A parameter whose value from the command line is checked as Luigi's parser reads it: a
    value of the wrong type is one sentence naming the flag, the value and the type, and exit
    status 2 (Luigi would fail later with "Uncaught exception" and no name)."""

    kind = "a valid value"

    def _parser_kwargs(self, param_name, task_name=None):
        kwargs = super()._parser_kwargs(param_name, task_name)
        flag = "--" + (f"{task_name}_{param_name}" if task_name else param_name).replace("_", "-")

        def checked(raw: str) -> str:
            try:
                self.parse(raw)
            except (ValueError, TypeError):
                print(f"error: {flag} is {raw!r}, expected {self.kind}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            return raw  # Luigi parses it itself

        kwargs["type"] = checked
        return kwargs


class Int(Typed, luigi.IntParameter):
    kind = "an integer"


class Real(Typed, luigi.FloatParameter):
    """A finite real number (NaN and infinities are refused like any other bad value)."""

    kind = "a finite number"

    def parse(self, s):
        value = super().parse(s)
        if not math.isfinite(value):
            raise ValueError(f"{s!r} is not a finite number")
        return value


class Flag(Typed, luigi.BoolParameter):
    """true or false, given after the flag (``--FinalCompressed-int8 false``)."""

    kind = "true or false"

    def __init__(self, **kwargs):
        super().__init__(parsing=luigi.BoolParameter.EXPLICIT_PARSING, **kwargs)

    def parse(self, val):
        if isinstance(val, str) and val.lower() not in ("true", "false"):
            raise ValueError(f"{val!r} is not true or false")
        return super().parse(val)


class Count(Int):
    """A whole number of at least ``minimum``; ``zero`` says what 0 means where 0 is also accepted
    ("all", "never"); ``at_least`` names another parameter of the task that a non-zero value must
    reach (a token count of at least ``seq_len``)."""

    def __init__(self, minimum: int = 1, *, zero: str = "", at_least: str = "", **kwargs):
        super().__init__(**kwargs)
        self.minimum, self.zero, self.at_least = minimum, zero, at_least

    def problem(self, task, value: int) -> str | None:
        if value == 0 and self.zero:
            return None
        floor, wanted = self.minimum, "a positive integer" if self.minimum == 1 else f"at least {self.minimum}"
        if self.at_least and getattr(task, self.at_least) > floor:
            floor = getattr(task, self.at_least)
            wanted = f"at least {self.at_least} {floor}"
        if value >= floor:
            return None
        return "expected " + (f"0 ({self.zero}) or " if self.zero else "") + wanted


class SeqLen(Count):
    """Tokens per window: at least 1 and at most the model's ``n_positions`` (``task.positions()``)."""

    def problem(self, task, value: int) -> str | None:
        limit = task.positions()
        if 1 <= value <= limit:
            return None
        return f"expected a positive integer of at most the model's n_positions {limit}"


class Number(Real):
    """A real number within bounds: ``above`` / ``below`` exclude the bound, ``at_least`` /
    ``at_most`` include it."""

    def __init__(self, *, above: float | None = None, at_least: float | None = None, below: float | None = None,
                 at_most: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.bounds = above, at_least, below, at_most

    def problem(self, task, value: float) -> str | None:
        above, at_least, below, at_most = self.bounds
        ok = ((above is None or value > above) and (at_least is None or value >= at_least)
              and (below is None or value < below) and (at_most is None or value <= at_most))
        if ok:
            return None
        low = f"{above:g} < " if above is not None else f"{at_least:g} <= " if at_least is not None else ""
        high = f" < {below:g}" if below is not None else f" <= {at_most:g}" if at_most is not None else ""
        if not high:  # "x > 0" reads better than "0 < x"
            low = f" > {above:g}" if above is not None else f" >= {at_least:g}"
            return f"expected x{low}"
        return f"expected {low}x{high}"


class Choice(luigi.Parameter):
    """One of ``choices``."""

    def __init__(self, *, choices: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.choices = tuple(choices)

    def expected(self) -> str:
        return "one of " + ", ".join(sorted(self.choices))

    def problem(self, task, value: str) -> str | None:
        return None if value in self.choices else f"expected {self.expected()}"


class HarnessTasks(luigi.Parameter):
    """lm-evaluation-harness task names, comma-separated (empty: none), each one the harness knows,
    with the task files of the stage's ``harness_include`` directory beside its own."""

    def problem(self, task, value: str) -> str | None:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            return None
        include = getattr(task, "harness_include", "")
        if include and not Path(include).is_dir():
            return f"expected tasks of harness_include {include!r}, which is not a directory"
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            return "expected nothing without the lm-eval package (pip install -e '.[harness]')"
        known = set(TaskManager(include_path=include or None).all_tasks)
        unknown = [n for n in names if n not in known]
        return f"expected tasks the harness knows; it has no {', '.join(unknown)}" if unknown else None


def problems(task) -> list[str]:
    """``<Stage> <name> is <value>, expected ...`` for each parameter of ``task`` whose value it
    does not accept."""
    found = []
    for name, param in task.get_params():
        check = getattr(param, "problem", None)
        value = getattr(task, name)
        problem = check(task, value) if check else None
        if problem:
            found.append(f"{task.get_task_family()} {name} is {value!r}, {problem}")
    return found
