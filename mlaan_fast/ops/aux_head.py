"""Fused auxiliary-head loss: global-average-pool -> Linear -> softmax cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def aux_head_loss(features, weight, bias, target, *, reduction="mean", label_smoothing=0.0, return_logits=False):
    """features [B,C,H,W] or [B,C]; weight [N,C]; bias [N] or None; target int64 [B] -> loss (, logits [B,N])."""
    pooled = features.float().mean(dim=(2, 3)) if features.dim() == 4 else features.float()
    logits = F.linear(pooled, weight.float(), None if bias is None else bias.float())
    loss = F.cross_entropy(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    return (loss, logits) if return_logits else loss
