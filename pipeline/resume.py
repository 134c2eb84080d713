"""Per-layer progress of the stages that work layer by layer (clustering, router training): each
finished layer is saved in the build's resume directory, so a rerun after a crash redoes only the
layer it was in."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.artifacts import save_safetensors


class LayerCheckpoints:
    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None

    def _path(self, layer: int) -> Path:
        return self.directory / f"layer_{layer:03d}.safetensors"

    def load(self, layer: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, info) saved for ``layer``, or None."""
        if self.directory is None or not self._path(layer).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(layer)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])

    def save(self, layer: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        if self.directory is not None:
            save_safetensors(tensors, self._path(layer), metadata={"info": json.dumps(info, sort_keys=True)})
