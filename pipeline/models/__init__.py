"""The GPT-J model, its presets and checkpoint I/O.

Configs and presets import without torch (the Luigi graph and ``make status`` need only them);
the model and checkpoint functions load torch on first use.
"""
from typing import TYPE_CHECKING

from .config import CheckpointError, GPTJConfig, checkpoint_config
from .presets import PRESETS, get_preset

if TYPE_CHECKING:  # also how the code fingerprint (pipeline/artifacts.py) sees these modules
    from .gptj import GPTJ
    from .hf import from_pretrained, load_state_dict_from_dir, save_pretrained

_LAZY = {"GPTJ": "gptj", "from_pretrained": "hf", "load_state_dict_from_dir": "hf",
         "save_pretrained": "hf"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GPTJConfig", "GPTJ", "PRESETS", "get_preset", "checkpoint_config",
           "from_pretrained", "save_pretrained", "load_state_dict_from_dir", "CheckpointError"]
