"""DGL auxiliary head: 3 x (1x1 conv, BN, ReLU) -> GAP -> 3 x (Linear, BN1d, ReLU) -> Linear -> CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mlaan_fast.nn.conv_bn_relu_stack import conv_bn_relu_stack
from mlaan_fast.ops import aux_head_loss


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 (fp64 stays fp64, for exact gradient tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class DGLAuxHead(nn.Module):
    """Loss of the DGL head on features [B,C,H,W] with int64 targets [B].

    ``fused=True``: the last Linear + CE is the fused op and, with ``lean=True``, the conv stack
    keeps one tensor per layer for backward (:mod:`mlaan_fast.nn.conv_bn_relu_stack`: half the
    memory, one extra BatchNorm pass per layer in backward);
    ``fused=False``: plain modules, as the reference code runs them. ``check_target``: see
    :class:`~mlaan_fast.nn.LinearAuxHead`.
    """

    def __init__(self, in_channels: int, num_classes: int, *, conv_channels: int = 128,
                 hidden: int = 512, depth: int = 3, fused: bool = True, lean: bool = True,
                 check_target: bool | None = None):
        super().__init__()
        convs, c = [], in_channels
        for _ in range(depth):
            convs += [nn.Conv2d(c, conv_channels, 1, bias=False), nn.BatchNorm2d(conv_channels),
                      nn.ReLU(inplace=True)]
            c = conv_channels
        self.convs = nn.Sequential(*convs)
        mlp = []
        for _ in range(depth):
            mlp += [nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            c = hidden
        self.mlp = nn.Sequential(*mlp)
        self.fc = nn.Linear(c, num_classes)
        self.fused, self.lean = fused, lean
        self.check_target = check_target  # False: labels validated on the host, no device sync; None: context
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: torch.Tensor, target: torch.Tensor, *, reduction: str = "mean"):
        """features [B,C,H,W], target int64 [B] -> loss (0-dim fp32 for "mean"/"sum")."""
        convs = conv_bn_relu_stack(features, self.convs) if self.fused and self.lean else self.convs(features)
        pooled = convs.mean(dim=(2, 3))
        hidden = self.mlp(pooled)
        if self.fused:
            return aux_head_loss(hidden, self.fc.weight, self.fc.bias, target, reduction=reduction,
                                 check_target=self.check_target)
        return F.cross_entropy(_fp32_or_wider(self.fc(hidden)), target, reduction=reduction)
