"""Luigi tasks, one module per stage: ``luigi --module tasks BaseModel``."""
from tasks.stage import Stage, check_config, pipeline_settings
from tasks.corpus import Corpus
from tasks.base_model import BaseModel
from tasks.relu_model import ReluModel
from tasks.hidden_states import HiddenStates

# The stages whose upstream closure is "the whole current graph" (status, gc, the no-op bench).
TARGETS = (HiddenStates,)

check_config([pipeline_settings, Corpus, BaseModel, ReluModel, HiddenStates])

__all__ = ["Stage", "pipeline_settings", "Corpus", "BaseModel", "ReluModel", "HiddenStates", "TARGETS"]
