"""Data curation before training: quality filters and dedup, Self-Instruct generation, SDFT rewriting."""

from jaxtune.curate.filter import FilterConfig, curate
from jaxtune.curate.report import CurateReport
from jaxtune.curate.sdft import SdftConfig, distill
from jaxtune.curate.self_instruct import SelfInstructConfig, load_seed_tasks, self_instruct_dataset
from jaxtune.curate.similarity import MinHashIndex, RougeIndex, rouge_l

__all__ = ["CurateReport", "FilterConfig", "MinHashIndex", "RougeIndex", "SdftConfig", "SelfInstructConfig",
           "curate", "distill", "load_seed_tasks", "rouge_l", "self_instruct_dataset"]
