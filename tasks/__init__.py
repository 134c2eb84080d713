"""Luigi tasks, one module per stage: ``luigi --module tasks BaseModel``."""
import luigi

from tasks.config import check_config
from tasks.stage import Stage, pipeline_settings
from tasks.corpus import Corpus
from tasks.base_model import BaseModel
from tasks.relu_model import ReluModel
from tasks.hidden_states import HiddenStates
from tasks.expert_clusters import ExpertClusters
from tasks.routers import Routers
from tasks.moefied import Moefied
from tasks.pruning_masks import PruningMasks
from tasks.final_compressed import FinalCompressed
from tasks.report import Report

# The stages whose upstream closure is "the whole current graph" (status, gc, the no-op bench).
TARGETS = (Moefied, Report)


class AllStages(luigi.WrapperTask):
    """Every stage of the current graph: ``luigi --module tasks AllStages``."""

    def requires(self):
        return [cls() for cls in TARGETS]


check_config([pipeline_settings, Corpus, BaseModel, ReluModel, HiddenStates, ExpertClusters, Routers, Moefied, PruningMasks,
              FinalCompressed, Report])

__all__ = ["Stage", "pipeline_settings", "Corpus", "BaseModel", "ReluModel", "HiddenStates", "ExpertClusters",
           "Routers", "Moefied", "PruningMasks", "FinalCompressed", "Report", "AllStages", "TARGETS"]
