"""The runtime: what runs a training step on devices (switches, CUDA streams and graphs, data parallelism,
the module pipeline)."""
import torch

from mlaan_fast.runtime.graphed import GraphedLocalStep
from mlaan_fast.runtime.step import LocalStep
from mlaan_fast.runtime.streams import side_stream

__all__ = ["GraphedLocalStep", "LocalStep", "make_step", "side_stream"]


def make_step(model, *, overlap: bool = False, amp_dtype: torch.dtype | None = None,
              check_targets: bool = True, cuda_graphs: bool = False, microbatches: int = 1):
    """A :class:`LocalStep`, or with ``cuda_graphs`` a :class:`GraphedLocalStep` (CUDA only), with these
    switches."""
    if cuda_graphs:
        if microbatches != 1:
            raise ValueError("cuda_graphs and microbatches: a captured step runs the whole batch; choose one")
        return GraphedLocalStep(model, amp_dtype=amp_dtype, overlap=overlap)
    return LocalStep(model, overlap=overlap, amp_dtype=amp_dtype, check_targets=check_targets,
                     microbatches=microbatches)
