import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
        proc = subprocess.run([sys.executable, *args], cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def luigi(self, *args, check=True) -> subprocess.CompletedProcess:
        return self.run("-m", "luigi", "--module", "tasks", *args, check=check)

    def status(self, *args) -> dict:
        out = self.run("-m", "pipeline.status", "--json", *args).stdout
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
