"""The runtime: what runs a training step on devices (switches, CUDA streams and graphs, data parallelism)."""
from mlaan_fast.runtime.graphed import GraphedLocalStep
from mlaan_fast.runtime.step import LocalStep, make_step
from mlaan_fast.runtime.streams import side_stream

__all__ = ["GraphedLocalStep", "LocalStep", "make_step", "side_stream"]
