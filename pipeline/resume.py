"""Per-layer progress of the stages that work layer by layer (clustering, router training): each
finished layer is saved in the build's resume directory, so a rerun after a crash redoes only the
layer it was in. The layers may be split over torchrun ranks (``pipeline.layerwise``): each rank
keeps its own layers here, and the stage's process then finds them all done."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from kernels.threads import parallel_map
from pipeline.artifacts import save_safetensors

Saved = tuple[dict[str, torch.Tensor], dict]


class LayerCheckpoints:
    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None

    def _path(self, layer: int) -> Path:
        return self.directory / f"layer_{layer:03d}.safetensors"

    def load(self, layer: int) -> Saved | None:
        """(tensors, info) saved for ``layer``, or None."""
        if self.directory is None or not self._path(layer).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self._path(layer)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["info"])

    def save(self, layer: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        if self.directory is not None:
            save_safetensors(tensors, self._path(layer), metadata={"info": json.dumps(info, sort_keys=True)})

    def each(self, work, layers, desc: str, parallel: bool = True) -> dict[int, Saved]:
        """{layer: (tensors, info)} for ``layers``: what was saved, else ``work(layer)``, saved as it
        finishes. ``parallel``: the layers spread over Python threads, one torch thread each (on
        the CPU: the result does not depend on the thread count, nor on how the layers are split)."""
        layers = list(layers)
        bar = tqdm(total=len(layers), desc=desc, unit="layer")

        def one(i: int) -> Saved:
            if (saved := self.load(i)) is None:
                saved = work(i)
                self.save(i, *saved)
            bar.update(1)
            return saved

        results = parallel_map(one, layers) if parallel else [one(i) for i in layers]
        bar.close()
        return dict(zip(layers, results))
