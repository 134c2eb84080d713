"""The compression methods (and optional code paths) that a run composes, each imported only
when it is used.

A stage's version covers the source of the code it runs (``pipeline/artifacts.py`` follows the
imports of its task module). The methods are the exception: the training entry point and the
stages import a method through ``use`` only when their flags or toggles ask for it, and the
import scanner does not follow ``use``. A stage therefore declares the methods its parameters
turn on (``Stage.methods``), and its version covers exactly those modules.

A forgotten declaration cannot under-version a stage silently: while a stage builds, the methods
it declared are in ``PIPELINE_METHODS`` (inherited by its torchrun ranks), and ``use`` refuses a
method that is not among them.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

METHODS = {
    "distill": "pipeline.distill",  # BMDistill: knowledge distillation
    "prune": "pipeline.prune",  # BMPrune: 2:4 masks and their training hooks
    "quant": "pipeline.quant",  # BMQuant: int8 quantization-aware training and the int8 model
    "moe": "pipeline.moefication.routed",  # BMMoE in training: each FFN computes its router's top-k
    "compressed": "pipeline.compressed",  # the int8 (MoE) model on disk and in memory
    "serving": "pipeline.serving",  # its GPU kernels, chosen per shape at export where a GPU is
    "coactivation": "pipeline.moefication.coactivation",  # ExpertClusters' features from the hidden states
}
DECLARED_ENV = "PIPELINE_METHODS"


class UndeclaredMethod(RuntimeError):
    pass


def modules(names) -> list[str]:
    """The modules of the methods ``names``, which a stage's version covers."""
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; the methods are {', '.join(METHODS)}")
    return [METHODS[n] for n in sorted(set(names))]


def use(name: str) -> ModuleType:
    """The module of method ``name``; inside a stage's build, only a method the stage declared."""
    declared = os.environ.get(DECLARED_ENV)
    if declared is not None and name not in declared.split(","):
        raise UndeclaredMethod(f"method {name!r} ({METHODS[name]}) runs in a stage that did not declare it "
                               f"(declared: {declared or 'none'}); add it to the stage's methods() so that "
                               f"the stage's version covers its code")
    return importlib.import_module(METHODS[name])
