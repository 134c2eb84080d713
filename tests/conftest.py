import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import commands

ROOT = Path(__file__).resolve().parent.parent
SMOKE_CFG = ROOT / "tests" / "smoke.cfg"


class Project:
    """A copy of the project's code in a temp dir (so tests may edit sources) with its own
    artifact store, driven through the real command lines."""

    def __init__(self, root: Path):
        self.root = root
        self.artifacts = root / "artifacts"
        self.env = {**os.environ, "PIPELINE_ARTIFACTS": str(self.artifacts), "LUIGI_CONFIG_PATH": str(SMOKE_CFG),
                    "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}

    def run(self, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
        """Run the interpreter with ``args`` in this project; with ``check``, a failure reports the
        command, its output and every log it left in the store."""
        return commands.run([sys.executable, *args], roots=[self.artifacts], check=check, timeout=timeout,
                            cwd=self.root, env=self.env)

    def luigi(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.run("-m", "luigi", "--module", "tasks", *args, check=check)

    def status(self, *args) -> dict:
        out = self.run("-m", "tasks.status", "--json", *args).stdout
        return {e["stage"]: e for e in json.loads(out)}

    def versions(self, stage: str) -> list[str]:
        d = self.artifacts / stage
        return sorted(p.name for p in d.iterdir() if (p / "manifest.json").is_file()) if d.is_dir() else []

    def edit(self, relpath: str, old: str, new: str) -> None:
        path = self.root / relpath
        text = path.read_text()
        assert old in text, f"{old!r} not in {relpath}"
        path.write_text(text.replace(old, new, 1))


def make_project(root: Path) -> Project:
    root.mkdir()
    for name in ("pipeline", "tasks", "kernels"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("luigi.cfg", "Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, root / name)
    return Project(root)


@pytest.fixture
def project(tmp_path) -> Project:
    return make_project(tmp_path / "project")


SLOW_FIXTURES = {"chain", "project", "default_project"}  # they build stages through the real commands


def pytest_collection_modifyitems(items):
    """The fast tier (``make test-fast``) leaves out what builds stages or starts torchrun; the
    chain tier (``make test-chain``, which CI runs after ``make test``) is what runs on the whole
    smoke chain, built once, and the longest scenarios of its own."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if "chain" in fixtures:
            item.add_marker(pytest.mark.chain)


TWO_RANKS = ("--pipeline-nproc-per-node", "2")  # as the chain was built: the same versions


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Project:
    """The whole chain on the smoke preset with two torchrun ranks, through the Makefile as a user
    runs it: `make moefy NPROC=2`, then `make compress NPROC=2`. Built once per session."""
    project = make_project(tmp_path_factory.mktemp("chain") / "project")
    venv = sys.prefix  # the running environment; -o: never reinstall it from the copied pyproject
    for target in ("moefy", "compress"):
        commands.run(["make", "-o", f"{venv}/.installed", target, "NPROC=2", f"VENV={venv}"],
                     roots=[project.artifacts], timeout=1200, cwd=project.root, env=project.env)
    return project


@pytest.fixture
def relu_model_and_checkpoint(tmp_path):
    """A random ReLU smoke model and a Routers-like directory for it: 8 balanced k-means experts
    per layer, routers near the expert centroids."""
    import torch
    from safetensors.torch import save_file

    from pipeline.models import GPTJ, get_preset
    from pipeline.moefication import balanced_kmeans
    from pipeline.moefication.clustering import expert_centroids

    torch.manual_seed(0)
    model = GPTJ(get_preset("gpt-j-smoke").replace(activation="relu")).eval()
    clusters, routers = {}, {}
    for i, block in enumerate(model.transformer.h):
        rows = block.mlp.fc_in.weight.detach().numpy()
        labels = balanced_kmeans(rows, 8, seed=i)
        clusters[f"layer_{i:03d}.labels"] = torch.from_numpy(labels)
        routers[f"layer_{i:03d}.a"] = expert_centroids(rows, labels) + 0.1 * torch.randn(8, 64)
        routers[f"layer_{i:03d}.b"] = torch.eye(8) + 0.1 * torch.randn(8, 8)
    save_file(clusters, str(tmp_path / "clusters.safetensors"))
    save_file(routers, str(tmp_path / "routers.safetensors"))
    return model, tmp_path


def artifact(project, stage, pick=None):
    paths = sorted(project.artifacts.glob(f"{stage}/*/manifest.json"))
    manifests = [(p.parent, json.loads(p.read_text())) for p in paths]
    if pick:
        manifests = [m for m in manifests if pick(m[1])]
    assert len(manifests) == 1, (stage, [p for p, _ in manifests])
    return manifests[0]
