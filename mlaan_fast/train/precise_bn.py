"""BatchNorm running statistics recomputed before an evaluation ("precise BN").

In training mode BatchNorm normalises by each batch's own statistics and keeps a running average
(momentum 0.1) for evaluation. While the weights move fast, as in a short run's first epoch, that
average lags them, and the mismatch compounds through the layers: a network that classifies well
in training mode can score near chance in evaluation mode. Recomputing the statistics of the
inference path (the backbone) on a few training batches with the current weights removes the lag;
training itself (weights, gradients, the optimizer) is untouched.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recompute_batchnorm_statistics(backbone: nn.Module, batches, images: int) -> int:
    """Running mean/var of every BatchNorm layer in ``backbone`` (a module, or a ModuleList run in
    order) set to their average over the first ``images`` images of ``batches`` (images [B,3,H,W] on
    its device), by training-mode forwards without autograd; -> the number of images used. Momentum,
    ``num_batches_tracked`` and every submodule's training/eval mode are kept."""
    layers = [m for m in backbone.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers or images <= 0:
        return 0
    kept = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    modes = [(m, m.training) for m in backbone.modules()]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    backbone.train()
    seen = 0
    try:
        with torch.compiler.set_stance("force_eager"):  # a compiled part would trace a no-grad graph
            for batch in batches:
                _forward(backbone, batch[: images - seen])
                seen += min(batch.shape[0], images - seen)
                if seen >= images:
                    break
    finally:
        for m, (momentum, count) in zip(layers, kept):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        for m, training in modes:
            m.training = training
    return seen


def _forward(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(backbone, nn.ModuleList):
        for module in backbone:
            x = module(x)
        return x
    return backbone(x)
