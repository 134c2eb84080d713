"""``python -m tasks.status [--json] [--paths] [luigi overrides]``: is every stage of the current
graph up to date (``up-to-date``, ``partial``: an unfinished build holds resumable progress,
``stale``, ``missing`` or ``broken``), and if not, why.

The current graph comes from the Luigi tasks (luigi.cfg and the same ``--Task-param`` overrides
the ``luigi`` command takes); this module only compares it with the store.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import sys

from pipeline import cli
from pipeline.artifacts import CorruptArtifact, StageSpec, Store, describe_changes
from pipeline.cli import UsageError


def current_specs(overrides: list[str]) -> list[StageSpec]:
    """The specs of every stage the targets of ``tasks`` need, with luigi.cfg and ``overrides``
    applied as the ``luigi`` command would."""
    with current_graph(overrides) as stages:
        return [t.spec() for t in stages]


@contextlib.contextmanager
def current_graph(overrides: list[str], targets: tuple[str, ...] = ()):
    """Every stage ``targets`` (default: ``tasks.TARGETS``) need, upstream first, with luigi.cfg
    and ``overrides`` applied as the ``luigi`` command would; the parameters hold while inside."""
    from luigi.cmdline_parser import CmdlineParser

    tasks = importlib.import_module("tasks")
    from tasks.stage import graph

    classes = [getattr(tasks, t) for t in targets] or list(tasks.TARGETS)
    with CmdlineParser.global_instance([classes[-1].__name__, *overrides]):
        yield graph([cls() for cls in classes])


def parse_graph_command(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, list[StageSpec]]:
    """Parse the command's own flags, pass the rest to Luigi as overrides, and compute the graph;
    bad parameters exit with one sentence and status 2."""
    args, overrides = parser.parse_known_args(argv)
    try:
        return args, current_specs(overrides)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


@functools.lru_cache(maxsize=None)
def stage_classes() -> dict:
    """{stage name: its Stage class}."""
    import tasks

    return {cls.get_task_family(): cls for cls in (getattr(tasks, n) for n in tasks.__all__)
            if isinstance(cls, type) and issubclass(cls, tasks.Stage) and cls is not tasks.Stage}


def open_store() -> Store:
    """The store PIPELINE_ARTIFACTS names (or the project's); one sentence when it cannot be one."""
    try:
        return Store()
    except ValueError as e:
        raise UsageError(str(e)) from None


def stage_status(spec: StageSpec, store: Store, full: bool = False) -> dict:
    """up-to-date, broken (published, but a file no longer matches its manifest), stale or missing.
    Files unchanged since they were last verified are not reread unless ``full``."""
    entry = {"stage": spec.stage, "version": spec.version, "state": "up-to-date", "reasons": [],
             "path": str(store.version_dir(spec.stage, spec.version))}
    try:
        if (artifact := store.get(spec.stage, spec.version)) is not None:
            store.verify(artifact, full=full)
            return entry
    except CorruptArtifact as e:
        return {**entry, "state": "broken", "reasons": [str(e)]}
    if (resume := store.partial(spec.stage, spec.version)) is not None:
        progress = stage_classes()[spec.stage].progress(resume, spec.params)
        return {**entry, "state": "partial", "path": str(resume.parent),
                "reasons": [f"{progress}: an unfinished build left it in {resume.parent} (the same run command "
                            f"continues it)"]}
    # a stage with several instances in the graph (FinalCompressed variants): compare like with like
    instance = stage_classes()[spec.stage].instance
    published = [a for a in store.versions(spec.stage) if instance(a.manifest["params"]) == instance(spec.params)]
    entry["path"] = None
    if not published:
        return {**entry, "state": "missing", "reasons": ["never built"]}
    same_params = [a for a in published if a.manifest.get("params") == spec.params]
    latest = (same_params or published)[-1]
    return {**entry, "state": "stale", "reasons": describe_changes(spec, latest.manifest),
            "compared_with": latest.version}


def instance_label(spec: StageSpec, specs: list[StageSpec]) -> str:
    """For a stage that appears more than once in the graph, the parameters that tell it apart."""
    siblings = [s for s in specs if s.stage == spec.stage]
    if len(siblings) < 2:
        return ""
    instance = stage_classes()[spec.stage].instance  # the parameters that make instances, where declared
    own = instance(spec.params) or spec.params
    differing = sorted(k for k in own if len({repr(s.params.get(k)) for s in siblings}) > 1)
    parts = [f"{k}={spec.params[k]}" for k in differing]
    if not parts:  # the same parameters on different inputs (Routers on two clusterings): name the inputs
        by_version = {s.version: s for s in specs}
        for name, version in sorted(spec.upstream.items()):
            if len({s.upstream.get(name) for s in siblings}) > 1 and version in by_version:
                label = instance_label(by_version[version], specs)
                parts.append(f"{name} {label.strip('()')}" if label else f"{name}={version}")
    return "(" + ", ".join(parts) + ")"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object per stage")
    p.add_argument("--verify", action="store_true", help="rehash every file, even those unchanged since last verified")
    p.add_argument("--paths", action="store_true", help="show where each stage's artifact (or unfinished build) lies")
    args, specs = parse_graph_command(p, argv)
    store = open_store()
    entries = [stage_status(s, store, args.verify) for s in specs]
    code = 1 if any(e["state"] == "broken" for e in entries) else 0
    if args.json:
        described = [{**e, "label": instance_label(s, specs), "params": s.params, "upstream": s.upstream}
                     for e, s in zip(entries, specs)]
        print(json.dumps(described, indent=2))
        return code
    print(f"artifacts: {store.root}")
    for e, spec in zip(entries, specs):
        print(f"{e['stage']:<16} {e['state']:<11} {e['version']}  {instance_label(spec, specs)}".rstrip())
        if args.paths and e["path"]:
            print(f"{'':<16} at {e['path']}")
        for reason in e["reasons"]:
            print(f"{'':<16} - {reason}")
    return code


if __name__ == "__main__":
    cli.run(main)
