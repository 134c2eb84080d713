"""The Luigi side of the artifact store: a Stage is complete when its current version exists.

A stage declares its upstream stages, its effective parameters and how to build; this base
class turns that into a version, a Luigi output and an atomic publish.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

import luigi

from pipeline import processes, resources
from pipeline.artifacts import AlreadyPublished, Artifact, Build, CorruptArtifact, StageSpec, Store, code_files
from tasks.params import Int, problems

logger = logging.getLogger("luigi-interface")
PROJECT_CONFIG = Path(__file__).resolve().parent.parent / "luigi.cfg"


def _read_project_config_first() -> None:
    """luigi.cfg beside the code is where every parameter's default lives (the classes declare
    none): read it first, from any working directory, so that a luigi.cfg in the working
    directory, LUIGI_CONFIG_PATH and the command line override it."""
    parser = luigi.configuration.LuigiConfigParser
    if str(PROJECT_CONFIG) not in parser._config_paths:
        parser._config_paths.insert(0, str(PROJECT_CONFIG))
        parser.reload()


_read_project_config_first()


class pipeline_settings(luigi.Config):
    """The ``[pipeline]`` section: which model, which checkpoint, how many processes, what precision."""

    @classmethod
    def get_task_family(cls):
        return "pipeline"

    model = luigi.Parameter(description="model preset (gpt-j, gpt-j-tiny, gpt-j-smoke)")
    checkpoint = luigi.Parameter(description="Hugging Face GPT-J directory to import instead of pretraining")
    nproc_per_node = Int(description="torchrun processes per node")
    nnodes = Int(description="torchrun nodes")
    rdzv_endpoint = luigi.Parameter(description="torchrun rendezvous host:port when nnodes > 1")
    precision = luigi.Parameter(description="training compute precision: auto, fp32, bf16 or fp16")
    omp_spincount = Int(description="how long an idle OpenMP thread of a stage's ranks spins before it sleeps "
                                    "(GOMP_SPINCOUNT; 0: at once)")

    def world_size(self) -> int:
        """nproc_per_node x nnodes, checked, so that a run torchrun cannot start (or would wait for
        forever) is refused before any work."""
        for name in ("nproc_per_node", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"[pipeline] {name} is {getattr(self, name)}, expected at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"[pipeline] nnodes is {self.nnodes} and rdzv_endpoint is empty: the nodes of a "
                             f"multi-node run meet at a rendezvous; set rdzv_endpoint = host:port, the same on every "
                             f"node (e.g. --pipeline-rdzv-endpoint node0:29500)")
        return self.nproc_per_node * self.nnodes

    def architecture(self):
        """The GPTJConfig of the model this run compresses: the checkpoint's, or the preset's."""
        from pipeline.models.config import checkpoint_config
        from pipeline.models.presets import get_preset

        return checkpoint_config(self.checkpoint) if self.checkpoint else get_preset(self.model)

    def checkpoint_dir(self) -> Path | None:
        """The checkpoint directory, validated (it exists and holds a GPT-J config and weights), or
        None; BaseModel checks its tensors (``check_checkpoint``)."""
        if not self.checkpoint:
            return None
        from pipeline.models.config import checkpoint_config

        checkpoint_config(self.checkpoint)
        return Path(self.checkpoint).resolve()


@functools.lru_cache(maxsize=None)
def _code(modules: tuple[str, ...], exclude: tuple[str, ...]) -> dict:
    return code_files(list(modules), exclude)


def _stage_modules() -> set[str]:
    """The modules that define a stage (a Stage subclass with its own ``build``)."""
    found, todo = set(), [Stage]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "build" in vars(cls) and cls is not Stage:
            found.add(cls.__module__)
    return found


class Stage(luigi.Task):
    """Base of every pipeline stage. Subclasses implement ``effective_params`` and ``build``,
    and ``upstream`` when they consume other stages.

    The version covers the stage's module and what it imports, the module it runs in a
    subprocess (``ENTRY``) and the methods its parameters turn on (``methods``)."""

    ENTRY: str | None = None  # the module the stage runs under torchrun, if any

    def upstream(self) -> dict[str, "Stage"]:
        return {}

    def methods(self) -> tuple[str, ...]:
        """The compression methods (``pipeline.methods``) this stage's parameters turn on."""
        return ()

    def code_modules(self) -> tuple[str, ...]:
        from pipeline.methods import modules

        return (type(self).__module__, *([self.ENTRY] if self.ENTRY else []), *modules(self.methods()))

    def effective_params(self) -> dict:
        raise NotImplementedError

    def build(self, build: Build, inputs: dict[str, Artifact]) -> None:
        raise NotImplementedError

    @property
    def stage_name(self) -> str:
        return self.get_task_family()

    @classmethod
    def instance(cls, params: dict) -> dict:
        """Of a version's parameters, those that tell this stage's instances in one graph apart
        (FinalCompressed's toggles); gc keeps the newest version of each instance."""
        return {}

    @classmethod
    def progress(cls, resume: Path, params: dict) -> str:
        """What the resume directory of an unfinished build of a version with ``params`` holds, in
        words (``make status``)."""
        layers = len(list(resume.rglob("layer_*.safetensors")))
        if layers:
            return f"partial: resumable with {layers} layer(s) done"
        return f"partial: resumable from {sum(1 for p in resume.rglob('*') if p.is_file())} file(s) of progress"

    @classmethod
    def lineage(cls, params: dict) -> dict:
        """Of a version's parameters, those that say which model it belongs to (BaseModel's preset
        or checkpoint): gc keeps the newest version of each instance for every model ever built."""
        return {}

    def positions(self) -> int:
        """The longest window the model takes (its n_positions)."""
        return pipeline_settings().architecture().n_positions

    def check_params(self) -> None:
        """Refuse, in one sentence, a parameter value this stage does not accept (``tasks.params``)."""
        found = problems(self)
        if found:
            raise ValueError("; ".join(found))

    def spec(self) -> StageSpec:
        if getattr(self, "_spec", None) is None:
            self.check_params()
            ups = self.upstream()
            # other stages' modules: an upstream's version covers its code, and a stage class that
            # this one only names (to build the graph) runs none of its code here
            exclude = tuple(sorted(_stage_modules() - {type(self).__module__}))
            spec = StageSpec(stage=self.stage_name, params=self.effective_params(),
                             upstream={name: t.version for name, t in sorted(ups.items())},
                             code=_code(self.code_modules(), exclude))
            self.check_inputs(self._published_inputs(ups))
            self._spec = spec
        return self._spec

    def _published_inputs(self, ups: dict[str, "Stage"]) -> dict[str, Artifact]:
        """The upstream versions already published and intact (a broken one is left to the run that
        rebuilds it): what ``check_inputs`` can check while the graph is computed."""
        store, found = Store(), {}
        for name, task in ups.items():
            with contextlib.suppress(CorruptArtifact):
                if (artifact := store.get(task.stage_name, task.version)) is not None:
                    _verify_once(store, artifact)
                    found[name] = artifact
        return found

    @property
    def version(self) -> str:
        return self.spec().version

    def requires(self):
        return self.upstream()

    def complete(self):
        """Published and intact, and so is every published version of the graph behind it (checked
        through the store's stat cache). A broken version (a file that no longer matches its
        checksum) is moved aside, so that this run rebuilds it; an upstream version that was
        removed rather than damaged is not rebuilt for a complete target."""
        try:
            store = Store()
            return self._intact(store) and all(t._intact(store, missing_ok=True) for t in graph([self])[:-1])
        except (ValueError, OSError) as e:  # bad parameters or inputs, found while computing the version
            _report(self, e)
            raise SystemExit(2) from None  # before anything runs: the sentence is all the user needs

    def _intact(self, store: Store, missing_ok: bool = False) -> bool:
        try:
            artifact = store.get(self.stage_name, self.version)
            if artifact is not None:
                _verify_once(store, artifact)
            return artifact is not None or missing_ok
        except CorruptArtifact as problem:
            moved = store.quarantine(self.stage_name, self.version)
            print(f"warning: {self.stage_name}: {problem}; moved it to {moved}, rebuilding", file=sys.stderr,
                  flush=True)
            return False

    def result_path(self) -> Path:
        """What a person opens of this stage's artifact (``make compress`` ends by naming it)."""
        return Store().version_dir(self.stage_name, self.version)

    def output(self):
        return luigi.LocalTarget(str(Store().manifest_path(self.stage_name, self.version)))

    def check_inputs(self, inputs: dict[str, Artifact]) -> None:
        """Refuse inputs this stage cannot use (raise ValueError): while the graph is computed, with
        the inputs already published (``inputs`` may lack some), and again with all of them before
        the stage's resources are checked."""

    def needs(self) -> resources.Needs:
        """What building this stage writes to disk, holds in memory and computes, estimated from
        the model's architecture and the parameters before anything is built (``tasks.plan``
        prints it for the whole graph). By default: a stage that reads one model, holds two
        copies of it (the weights and what is computed from them) and writes at most half its
        size (masks, clusters)."""
        model = self.model_bytes()
        return resources.Needs(model / 2, 2 * model, "its input model in fp32, twice")

    def estimate(self) -> resources.Needs:
        """``needs``, with the stage's own process (and each local rank's) counted."""
        needs = self.needs()
        ranks = pipeline_settings().nproc_per_node if needs.rank_memory else 0
        needs.memory += (needs.process or resources.PROCESS_BYTES) + ranks * resources.PROCESS_BYTES
        return needs

    def model_bytes(self) -> float:
        """The fp32 bytes of the model this run compresses."""
        return 4.0 * pipeline_settings().architecture().num_params()

    def evaluation_needs(self, models: int, tokens: int, reference: bool = False) -> tuple[float, float]:
        """(FLOPs, bytes per rank) of evaluating ``models`` models on ``tokens`` tokens each; with
        a ``reference`` (the teacher's forward once, its outputs kept, ``TeacherOutputs``) too."""
        from pipeline.resources import TEACHER_CACHE_BYTES

        config = pipeline_settings().architecture()
        params = config.num_params()
        kept = min(TEACHER_CACHE_BYTES, 4.0 * tokens * config.vocab_size) if reference else 0.0
        return 2.0 * params * tokens * (models + reference), 4.0 * params + kept

    def open_inputs(self, store: Store) -> dict[str, Artifact]:
        """The upstream artifacts, each verified against its manifest; a broken one is moved aside
        and this stage stops with the file's name (the next run rebuilds it)."""
        inputs = {}
        for name, task in self.upstream().items():
            try:
                artifact = store.get(task.stage_name, task.version)
                if artifact is None:
                    raise RuntimeError(f"upstream {task.stage_name} {task.version} is not published")
                store.verify(artifact)
            except CorruptArtifact as e:
                store.quarantine(task.stage_name, task.version)
                raise CorruptArtifact(f"input {task.stage_name}: {e}") from None
            inputs[name] = artifact
        return inputs

    def run(self):
        store = Store()
        if store.get(self.stage_name, self.version) is not None:  # this run repaired what it was built from
            logger.info("%s %s: already published; its broken inputs were rebuilt", self.stage_name, self.version)
            return
        self.check_run_inputs()
        inputs = self.open_inputs(store)
        self.check_inputs(inputs)
        needs = self.estimate()
        resources.check(self.stage_name, needs, store.root)
        try:
            with store.publishing(self.spec()) as build:
                build.metrics.update(needs.as_metrics())
                self._build_logged(build, inputs)
        except AlreadyPublished as e:
            logger.info("%s", e)
            return
        logger.info("%s %s: published with metrics %s", self.stage_name, self.version,
                    {k: v for k, v in build.metrics.items() if not isinstance(v, (list, dict))})

    def check_run_inputs(self) -> None:
        """Before this stage builds, every stage of the run checks the inputs published by now: the
        Corpus's token counts reach the stages that depend on them before any training."""
        from luigi.cmdline_parser import CmdlineParser

        parser = CmdlineParser.get_instance()
        root = parser.get_task_obj() if parser is not None else self
        roots = [root] if isinstance(root, Stage) else [t for t in luigi.task.flatten(root.requires())
                                                         if isinstance(t, Stage)]
        for task in graph(roots or [self]):
            try:
                task.check_inputs(task._published_inputs(task.upstream()))
            except ValueError as e:
                raise ValueError(f"{task.stage_name} (checked before {self.stage_name} builds): {e}") from None

    def _build_logged(self, build: Build, inputs: dict[str, Artifact]) -> None:
        from pipeline.methods import DECLARED_ENV

        handler = logging.FileHandler(build.path / "stage.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        before = os.environ.get(DECLARED_ENV)
        os.environ[DECLARED_ENV] = ",".join(self.methods())  # what pipeline.methods.use may load, ranks included
        try:
            logger.info("%s %s: building in %s", self.stage_name, self.version, build.path)
            self.build(build, inputs)
        finally:
            if before is None:
                os.environ.pop(DECLARED_ENV, None)
            else:
                os.environ[DECLARED_ENV] = before
            logger.removeHandler(handler)
            handler.close()


_VERIFIED: set[str] = set()


def layer_work_needs(layers: int, per_layer: float, held: float, assembling: float, disk: float,
                     what: str) -> resources.Needs:
    """A stage that works layer by layer (``tasks.layer_work.layers_on_ranks``): on the CPU as many
    layers at once as there are cores, spread over the local ranks (on GPUs fewer: one per rank),
    then the stage's process assembling them (``assembling``), with ``held`` throughout."""
    settings = pipeline_settings()
    local, world = settings.nproc_per_node, settings.world_size()
    at_once = min(layers, max(os.cpu_count() or 1, local))
    per_rank = per_layer * -(-at_once // local) if world > 1 else 0.0
    return resources.Needs(disk, held + max(at_once * per_layer, assembling), what, rank_memory=per_rank)


def _verify_once(store: Store, artifact: Artifact) -> None:
    """Verify a published version once per process: every stage's completeness check covers the
    graph behind it, so without this a run would verify the same upstream once per downstream
    stage. A stage still verifies its inputs itself (``open_inputs``) when it starts building."""
    key = str(artifact.path)
    if key not in _VERIFIED:
        store.verify(artifact)
        _VERIFIED.add(key)


def _report(task, exception) -> None:
    # Luigi logs a traceback; this is the one sentence a user needs, printed where it is seen.
    print(f"error: {task.get_task_family()}: {exception}", file=sys.stderr, flush=True)


Stage.event_handler(luigi.Event.FAILURE)(_report)


def _say_where(task) -> None:
    """When the run's root stage is done (built now or already), its last line names the result."""
    from luigi.cmdline_parser import CmdlineParser

    parser = CmdlineParser.get_instance()
    if parser is not None and parser.get_task_obj().task_id == task.task_id:
        path = task.result_path()
        atexit.register(lambda: print(f"{task.stage_name} is at {path}", flush=True))


Stage.event_handler(luigi.Event.SUCCESS)(_say_where)
Stage.event_handler(luigi.Event.DEPENDENCY_PRESENT)(_say_where)


class CommandFailed(RuntimeError):
    """A stage's subprocess (torchrun) failed; the message holds the tail of its output, and
    ``output`` all of it."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


# failures the user can act on from their message alone; others (bugs) keep their traceback
EXPECTED_FAILURES = (ValueError, OSError, CommandFailed, CorruptArtifact, resources.NotEnoughResources)


class _NoTracebackForExpectedFailures(logging.Filter):
    def filter(self, record):
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_FAILURES):
            record.exc_info = record.exc_text = None
        return True


logger.addFilter(_NoTracebackForExpectedFailures())


def run_logged(cmd: list[str], log_path: Path) -> None:
    """Run ``cmd``, streaming its output to the console and to ``log_path``; raise with the tail of
    the output when it fails."""
    lines: list[str] = []
    logger.info("running: %s", " ".join(cmd))
    spin = pipeline_settings().omp_spincount
    if spin < 0:
        raise ValueError(f"[pipeline] omp_spincount is {spin}, expected an integer >= 0")
    # read when the ranks load OpenMP; a GOMP_SPINCOUNT or OMP_WAIT_POLICY of the user's own wins
    env = dict(os.environ) if {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & set(os.environ) else \
        {**os.environ, "GOMP_SPINCOUNT": str(spin)}
    with open(log_path, "a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, bufsize=1, env=env,
                                                      preexec_fn=processes.die_with_parent) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            lines.append(line)
        code = proc.wait()
    if code != 0:
        output = "".join(lines)
        raise CommandFailed(f"command failed with exit code {code}: {' '.join(cmd)}\n" + "".join(lines[-20:]), output)


def graph(targets: list[Stage]) -> list[Stage]:
    """Every stage the targets need, upstream first, each once."""
    order: list[Stage] = []
    seen: set[str] = set()

    def visit(task: Stage):
        for t in task.upstream().values():
            visit(t)
        if task.task_id not in seen:
            seen.add(task.task_id)
            order.append(task)

    for target in targets:
        visit(target)
    return order
