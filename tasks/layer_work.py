"""Layer-by-layer work (clustering, router training) split over the ``[pipeline]`` ranks
(``pipeline.layerwise``), each rank keeping its layers in the stage's per-layer progress."""
from __future__ import annotations

from tasks.ranks import on_ranks
from tasks.stage import pipeline_settings


def layers_on_ranks(build, function, num_layer: int, tag: str, **kwargs) -> bool:
    """With several ranks, ``function(num_layer=..., **kwargs, layers=..., device=...)`` on each, rank r taking
    layers r, r + world, ... (each kept in the per-layer progress the stage then assembles from);
    False, and nothing run, with one rank: the stage does every layer itself."""
    from pipeline import layerwise

    if pipeline_settings().world_size() == 1:
        return False
    job = {"function": f"{function.__module__}:{function.__name__}", "num_layer": num_layer,
           "kwargs": {"num_layer": num_layer, **kwargs}}
    on_ranks(build, layerwise.__name__, job, tag)
    return True
