"""The module pipeline: one LocalModel's modules on P devices (stages), sync (exact) or async."""
from mlaan_fast.runtime.pipeline.comm import PipelineError
from mlaan_fast.runtime.pipeline.engine import MODES, Pipeline, PipelineGroups, make_groups
from mlaan_fast.runtime.pipeline.partition import (
    Partition,
    balanced_partition,
    even_partition,
    measure_module_costs,
)
from mlaan_fast.runtime.pipeline.stage import StageLayout, StageModel, layouts

__all__ = ["MODES", "Partition", "Pipeline", "PipelineError", "PipelineGroups", "StageLayout", "StageModel",
           "balanced_partition", "even_partition", "layouts", "make_groups", "measure_module_costs"]
