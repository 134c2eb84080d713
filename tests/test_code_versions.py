"""A stage's version covers the code it runs, and only that: appending a function to any module of
``pipeline/`` or ``kernels/`` changes the version of exactly the stages that run the module
(directly, or through an upstream stage whose version changes), measured through the real
``python -m tasks.status --json`` on the default graph (luigi.cfg)."""
import json
import sys
from pathlib import Path

import pytest

from conftest import ROOT, make_project

FC_ALL = "FinalCompressed(int8+pruning+moe+distill)"
FC_24 = "FinalCompressed(pruning+distill)"
FC_I8 = "FinalCompressed(int8+distill)"
FC_I8_24 = "FinalCompressed(int8+pruning+distill)"
FC_CONTROL = "FinalCompressed(distill)"  # the matched control: fine-tuning and KD, nothing compressed
FC_MOE = "FinalCompressed(moe+distill)"
FINALS = {FC_ALL, FC_24, FC_I8, FC_I8_24, FC_CONTROL, FC_MOE}
INT8 = {FC_ALL, FC_I8, FC_I8_24, "Report"}  # the int8 runs, and the Report's int8 baseline
PRUNE = {FC_ALL, FC_24, FC_I8_24, "PruningMasks(moe)", "PruningMasks(base)"}
TRAINING = {"BaseModel", "ReluModel"} | FINALS
CLUSTERING = {"ExpertClusters(coactivation)", "ExpertClusters(random)"}
ROUTERS = {"Routers(coactivation)", "Routers(random)"}
EVERY = "every stage"

# The stages that run each module themselves (the test adds every stage downstream of them).
RUNS = {
    "kernels/__init__.py": set(),  # re-exports only: stages import the kernels they run
    "kernels/backend.py": INT8,
    "kernels/bagged.py": INT8,  # pipeline.compressed runs it (the MoE decode path)
    "kernels/fbgemm.py": INT8,  # pipeline.quant.Int8Linear runs it (the deployed int8 layers)
    "kernels/gemm.py": INT8,
    "kernels/moe_gemv.c": INT8,  # compiled by kernels/moe_gemv.py: pipeline.compressed's MoE decode path
    "kernels/moe_gemv.py": INT8,
    "kernels/int8.py": INT8,
    "kernels/sparsity.py": PRUNE,
    "kernels/threads.py": PRUNE | CLUSTERING | ROUTERS,
    "pipeline/__init__.py": set(),
    "pipeline/artifacts.py": EVERY,  # the store publishes every stage
    "pipeline/cli.py": TRAINING,  # the training command's errors
    "pipeline/compressed.py": INT8,
    "pipeline/serving.py": INT8 - {"Report"},  # the int8 runs declare it: their export measures the GPU paths
    "pipeline/data.py": EVERY,
    "pipeline/decode.py": {"Report"},  # the report's decoding (and the generation command)
    "pipeline/distill.py": {"ReluModel"} | FINALS,
    "pipeline/distributed.py": TRAINING | {"HiddenStates"},
    "pipeline/evaluate.py": {"BaseModel"},
    "pipeline/harness.py": {"Report"},
    "pipeline/generate.py": {"Report"},  # the generation command, and the harness model loads through it
    "pipeline/launch.py": TRAINING | {"HiddenStates"},
    "pipeline/layerwise.py": CLUSTERING | ROUTERS,
    "pipeline/memory.py": TRAINING,
    "pipeline/precision.py": TRAINING,  # the training command resolves it; stages resolve auto once for their ranks
    "pipeline/methods.py": EVERY,
    "pipeline/models/__init__.py": {"BaseModel"},
    "pipeline/models/config.py": EVERY,
    "pipeline/models/gptj.py": {"BaseModel"},
    "pipeline/losses.py": {"BaseModel"},
    "pipeline/models/hf.py": {"BaseModel"},
    "pipeline/models/presets.py": EVERY,
    "pipeline/moefication/__init__.py": {"Report"},  # re-exports: pipeline.generate (the harness) imports BMMoE there
    "pipeline/moefication/clustering.py": CLUSTERING | ROUTERS,
    "pipeline/moefication/coactivation.py": {"ExpertClusters(coactivation)"},
    "pipeline/moefication/evaluation.py": {"Moefied"},
    "pipeline/moefication/experts.py": CLUSTERING | INT8 | {FC_ALL, "Moefied"},
    "pipeline/moefication/files.py": {"HiddenStates"} | CLUSTERING | ROUTERS | INT8 | {"PruningMasks(moe)",
                                                                                      "PruningMasks(base)"},
    "pipeline/moefication/hidden.py": {"HiddenStates"},
    "pipeline/moefication/mlp_select.py": ROUTERS,
    "pipeline/moefication/moe.py": {"Moefied", "Report"},
    "pipeline/moefication/param_cluster.py": CLUSTERING | ROUTERS,
    "pipeline/moefication/routed.py": {FC_ALL, FC_MOE, "Moefied", "Report"},
    "pipeline/moefication/router.py": ROUTERS | {FC_ALL, "Moefied", "Report"},
    "pipeline/moefication/sparse.py": {"Moefied", "Report"},
    "pipeline/processes.py": EVERY,
    "pipeline/prune.py": PRUNE,
    "pipeline/quant.py": INT8,
    "pipeline/sparse24.py": INT8,
    "pipeline/report.py": {"Report"},
    "pipeline/resources.py": EVERY,
    "pipeline/resume.py": CLUSTERING | ROUTERS,
    "pipeline/train.py": TRAINING,
}


def instance(entry: dict, by_version: dict) -> str:
    """A readable name for a stage of the default graph: the stage, with what tells its instances apart."""
    stage, params = entry["stage"], entry["params"]
    if stage == "ExpertClusters":
        return f"ExpertClusters({params['method']})"
    if stage == "Routers":
        return f"Routers({by_version[entry['upstream']['ExpertClusters']]['params']['method']})"
    if stage == "PruningMasks":
        return "PruningMasks(moe)" if "ExpertClusters" in entry["upstream"] else "PruningMasks(base)"
    if stage == "FinalCompressed":
        return "FinalCompressed(" + "+".join(t for t in ("int8", "pruning", "moe", "distill") if params[t]) + ")"
    return stage


def graph(project) -> dict[str, dict]:
    out = project.run("-m", "tasks.status", "--json").stdout
    entries = json.loads(out)
    by_version = {e["version"]: e for e in entries}
    return {instance(e, by_version): e for e in entries}


def downstream(graph: dict[str, dict], names: set[str]) -> set[str]:
    """``names`` and every stage whose upstream closure reaches one of them."""
    by_version = {e["version"]: n for n, e in graph.items()}
    found = set(names)
    while True:
        more = {n for n, e in graph.items() if any(by_version[v] in found for v in e["upstream"].values())}
        if more <= found:
            return found
        found |= more


@pytest.fixture(scope="module")
def default_project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("versions") / "project")
    del project.env["LUIGI_CONFIG_PATH"]  # the default graph: the project's own luigi.cfg
    return project, graph(project)


def test_every_module_has_a_row():
    modules = {p.relative_to(ROOT).as_posix() for d in ("pipeline", "kernels") for ext in ("py", "c")
               for p in (ROOT / d).rglob(f"*.{ext}")}
    assert modules == set(RUNS), f"rows missing: {sorted(modules - set(RUNS))}, stale: {sorted(set(RUNS) - modules)}"


@pytest.mark.chain  # one `tasks.status` run per module (about 6 s each): the chain tier
@pytest.mark.parametrize("module", sorted(RUNS))
def test_an_edit_restales_exactly_the_stages_that_run_it(default_project, module):
    p, before = default_project
    assert len(before) == 18, sorted(before)
    path = p.root / module
    original = path.read_text()
    try:
        appended = "\nint appended_by_a_test(void) { return 1; }\n" if path.suffix == ".c" else \
            "\n\ndef _appended_by_a_test():\n    return 1\n"
        path.write_text(original + appended)
        after = graph(p)
    finally:
        path.write_text(original)
    changed = {n for n in before if before[n]["version"] != after[n]["version"]}
    runs = set(before) if RUNS[module] == EVERY else RUNS[module]
    expected = downstream(before, runs)
    assert changed == expected, (f"{module}: restaled but does not run it: {sorted(changed - expected)}; "
                                 f"runs it but kept its version: {sorted(expected - changed)}")


if __name__ == "__main__":  # print the table: module -> stages restaled
    sys.path.insert(0, str(ROOT / "tests"))
    import tempfile

    project = make_project(Path(tempfile.mkdtemp()) / "project")
    del project.env["LUIGI_CONFIG_PATH"]
    g = graph(project)
    for module, runs in sorted(RUNS.items()):
        names = downstream(g, set(g) if runs == EVERY else runs)
        left = set(g) - names
        text = ("every stage" if not left else f"every stage but {', '.join(sorted(left))}" if len(left) < 3
                else ", ".join(sorted(names)) or "none")
        print(f"| `{module}` | {text} |")
