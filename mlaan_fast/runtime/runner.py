"""One process's training machinery behind one interface, for a whole model (alone or data-parallel)
and for one stage of a module pipeline: the trainer's loop is the same for both."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from mlaan_fast.ops import target_checks
from mlaan_fast.runtime.distributed import GradientReducer, broadcast_state


class ModelRunner:
    """The whole model on this rank: ``step`` through a LocalStep/GraphedLocalStep, gradients averaged over
    the data-parallel ``group`` (their all-reduce started as the schedule completes them)."""

    counts_samples = True  # this rank's batches count in the epoch's statistics

    def __init__(self, model, step_fn, group=None, overlap_allreduce: bool = True):
        self.model, self.step_fn, self.group = model, step_fn, group
        self.reducer = GradientReducer(self.parameters(), group)
        self.overlap_allreduce = overlap_allreduce

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer steps (trainable parameters, frozen EMA shadows excluded)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None) -> dict:
        """One step's local forwards and backwards; -> local_step's dict."""
        hook = self.reducer.ready if self.overlap_allreduce and self.reducer.world > 1 else None
        return self.step_fn(images, targets, grad_scaler=grad_scaler, on_grads_ready=hook)

    def reduce_gradients(self) -> None:
        """Average the gradients over the data-parallel ranks (waits for those already started)."""
        self.reducer.finish()

    def update_shadows(self) -> None:
        self.model.update_shadows()

    def broadcast_buffers(self, src: int = 0) -> None:
        """BatchNorm statistics of rank ``src`` on every data-parallel rank, as DDP keeps them."""
        broadcast_state(self.model, src=src, buffers_only=True, group=self.group)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def infer(self, images: torch.Tensor) -> torch.Tensor | None:
        """Logits of the inference path (backbone + classifier)."""
        return self.model(images)

    def whole_state(self, optimizer) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict) as a single-process checkpoint stores them."""
        return self.model.state_dict(), optimizer.state_dict()

    def drain(self) -> None:
        """Nothing is ever left under way."""


class PipelineRunner:
    """One stage of a module pipeline (``runtime.pipeline.Pipeline``); the data-parallel group is the
    stage's replicas. Statistics: the first stage counts samples, the last one has the logits."""

    def __init__(self, pipeline, amp_dtype: torch.dtype | None = None):
        self.pipeline, self.model, self.amp_dtype = pipeline, pipeline.model, amp_dtype
        self.group = pipeline.groups.data_parallel
        self.counts_samples = pipeline.layout.is_first
        self.reducer = GradientReducer(self.parameters(), self.group)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.pipeline.parameters()

    def _autocast(self, device: torch.device):
        return nullcontext() if self.amp_dtype is None else torch.autocast(device.type, dtype=self.amp_dtype)

    def step(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None) -> dict:
        # Labels are checked on the host by the trainer: the heads need no device sync.
        with self._autocast(images.device), target_checks(False):
            return self.pipeline.step(images, targets, grad_scaler)

    def reduce_gradients(self) -> None:
        self.reducer.finish()

    def update_shadows(self) -> None:
        self.pipeline.update_shadows()

    def broadcast_buffers(self, src: int | None = None) -> None:
        """BatchNorm statistics of replica 0's rank of this stage on its other replicas."""
        broadcast_state(self.model, src=self.pipeline.stage_index, buffers_only=True, group=self.group)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def infer(self, images: torch.Tensor) -> torch.Tensor | None:
        """Logits on the last stage (None elsewhere), the activations passed through every stage."""
        with self._autocast(images.device):
            return self.pipeline.infer(images)

    def whole_state(self, optimizer) -> tuple[dict, dict] | None:
        """The single-process checkpoint's (model, optimizer) state dicts on rank 0, None on other ranks
        (every rank must call this: it gathers)."""
        return self.pipeline.gather_state(optimizer)

    def drain(self) -> None:
        self.pipeline.drain()

