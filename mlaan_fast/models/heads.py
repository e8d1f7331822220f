"""Auxiliary heads by kind: "linear" (fused GAP/Linear/CE), "dgl", "infopro" (λ over the module index)."""
from __future__ import annotations

from torch import nn

from mlaan_fast.nn import DGLAuxHead, InfoProAuxHead, LinearAuxHead

HEAD_KINDS = ("linear", "dgl", "infopro")


def infopro_weights(module_index: int, num_modules: int, ixx_1: float, ixy_1: float, ixx_2: float,
                    ixy_2: float) -> tuple[float, float]:
    """(λ1, λ2) interpolated linearly from (ixx_1, ixy_1) at module 0 to (ixx_2, ixy_2) at module M-2."""
    ratio = module_index / (num_modules - 2) if num_modules > 2 else 0.0
    return ixx_1 * (1 - ratio) + ixx_2 * ratio, ixy_1 * (1 - ratio) + ixy_2 * ratio


def make_head(kind: str, in_channels: int, num_classes: int, *, module_index: int, num_modules: int,
              final_channels: int, options) -> nn.Module:
    """One auxiliary head computing a loss from features [B,in_channels,H,W] (and the image for InfoPro)."""
    fused = options.fused
    if kind == "linear":
        return LinearAuxHead(in_channels, num_classes, fused=fused)
    if kind == "dgl":
        return DGLAuxHead(in_channels, num_classes, fused=fused, lean=options.dgl_lean)
    if kind == "infopro":
        ixx, ixy = infopro_weights(module_index, num_modules, options.ixx_1, options.ixy_1,
                                   options.ixx_2, options.ixy_2)
        return InfoProAuxHead(in_channels, num_classes, image_mean=options.mean,
                              image_std=options.std, ixx=ixx, ixy=ixy,
                              final_channels=final_channels, fused=fused)
    raise ValueError(f"head kind: unknown {kind!r}; choose one of {', '.join(HEAD_KINDS)}")


def head_loss(head: nn.Module, features, images, targets):
    """The head's loss on features; InfoPro heads also read the (normalised) input images."""
    if isinstance(head, InfoProAuxHead):
        return head(features, targets, images)
    return head(features, targets)
