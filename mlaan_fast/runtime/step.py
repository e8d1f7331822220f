"""What runs one training iteration on a device: the model's schedule with the runtime's switches."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from mlaan_fast.ops import target_checks
from mlaan_fast.runtime.streams import side_stream
from mlaan_fast.settings import boolean, integer

AMP_DTYPES = (None, torch.bfloat16, torch.float16)


def check_overlap(model, overlap) -> bool:
    """``overlap`` as a bool; ValueError unless the model's schedule is ``once``."""
    overlap = boolean("overlap", overlap)
    if overlap and model.options.schedule != "once":
        raise ValueError("overlap needs schedule='once' (the straightforward schedule runs window by window)")
    return overlap


class MicroBatchScale:
    """The grad-scaler interface a schedule uses (``scale(loss)``), dividing each micro-batch's loss by
    their number ``n`` (so accumulated gradients are the mean over micro-batches) on top of an
    optional real gradient scaler."""

    def __init__(self, grad_scaler, n: int):
        self.grad_scaler, self.n = grad_scaler, n

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        loss = loss if self.grad_scaler is None else self.grad_scaler.scale(loss)
        return loss / self.n


def combine_microbatches(outs: list[dict]) -> dict:
    """local_step dicts of micro-batches -> one: losses averaged, logits concatenated (None if absent)."""
    n = len(outs)
    modules = range(len(outs[0]["module_losses"]))
    module_losses = [sum(o["module_losses"][m] for o in outs) / n for m in modules]
    logits = [o["logits"] for o in outs]
    return {"loss": torch.stack(module_losses).sum(), "module_losses": module_losses,
            "logits": None if any(t is None for t in logits) else torch.cat(logits)}


class LocalStep:
    """Callable ``(images, targets, grad_scaler=None) -> dict`` running ``model.local_step`` with:

    ``overlap`` (schedule ``once``: window j after module j+1's forward, and on a GPU the heads on a
    second CUDA stream), autocast to ``amp_dtype`` (None: fp32), ``check_targets`` (False where
    the caller validated the labels on the host: the fused heads then never sync to check them) and
    ``microbatches`` n (the batch runs as n micro-batches in turn whose gradients are averaged:
    gradient accumulation; BatchNorm then normalises each micro-batch by its own statistics and
    updates its running statistics n times per step)."""

    def __init__(self, model, *, overlap: bool = False, amp_dtype: torch.dtype | None = None,
                 check_targets: bool = True, microbatches: int = 1):
        if amp_dtype not in AMP_DTYPES:
            raise ValueError("LocalStep: amp_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {amp_dtype}")
        self.model, self.amp_dtype = model, amp_dtype
        self.overlap = check_overlap(model, overlap)
        self.check_targets = boolean("check_targets", check_targets)
        self.microbatches = integer(1)("microbatches", microbatches)

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.amp_dtype)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, grad_scaler=None,
                 on_grads_ready=None) -> dict:
        """images [B,3,H,W], int64 targets [B] on the model's device -> local_step's dict (.grad filled);
        ``on_grads_ready(params)`` hears of gradients complete for the step (the last micro-batch's)."""
        side = side_stream(images.device) if self.overlap and images.is_cuda else None
        n = self.microbatches
        if n > images.shape[0]:
            raise ValueError(f"microbatches: {n} micro-batches of a batch of {images.shape[0]} images")
        with self._autocast(images.device), target_checks(self.check_targets):
            if n == 1:
                return self.model.local_step(images, targets, grad_scaler, overlap=self.overlap,
                                             side_stream=side, on_grads_ready=on_grads_ready)
            scale = MicroBatchScale(grad_scaler, n)
            chunks = list(zip(images.tensor_split(n), targets.tensor_split(n)))
            return combine_microbatches([
                self.model.local_step(x, t, scale, overlap=self.overlap, side_stream=side,
                                      on_grads_ready=on_grads_ready if i == n - 1 else None)
                for i, (x, t) in enumerate(chunks)])
