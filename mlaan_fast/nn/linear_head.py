"""Linear auxiliary head: global-average-pool -> Linear -> softmax cross-entropy, fused or plain."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlaan_fast.ops import aux_head_loss


class LinearAuxHead(nn.Module):
    """Drop-in for ``AdaptiveAvgPool2d(1) -> Flatten -> Linear -> CrossEntropyLoss``; state is ``fc.*``.

    ``check_target`` (fused path): True raises ValueError for a target outside [0, num_classes), one
    host sync per call on a GPU; False skips it (labels validated on the host) and such a target then
    gives a NaN loss; None (the default) follows :func:`mlaan_fast.ops.target_checks`. The unfused
    path is plain PyTorch (F.cross_entropy checks on its own terms).
    """

    def __init__(self, in_channels: int, num_classes: int, bias: bool = True, fused: bool = True,
                 check_target: bool | None = None):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes, bias=bias)
        self.fused = fused
        self.check_target = check_target

    def forward(self, features: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean",
                return_correct: bool = False, check_target: bool | None = None):
        """features [B,C,H,W] or [B,C]; target int64 [B] -> loss, or (loss, correct: 0-dim int64).

        ``check_target`` (True or False) overrides the module's setting for this call."""
        if self.fused:
            check = self.check_target if check_target is None else check_target
            loss, logits = aux_head_loss(features, self.fc.weight, self.fc.bias, target, reduction=reduction,
                                         return_logits=True, check_target=check)
        else:
            pooled = F.adaptive_avg_pool2d(features, 1).flatten(1) if features.dim() == 4 else features
            logits = self.fc(pooled)
            loss = F.cross_entropy(logits, target, reduction=reduction)
        if not return_correct:
            return loss
        correct = (logits.detach().argmax(dim=1) == target).sum()
        return loss, correct

    def extra_repr(self) -> str:
        return f"fused={self.fused}, check_target={self.check_target}"
