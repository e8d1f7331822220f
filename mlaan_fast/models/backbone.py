"""A ResNet as stem + stages of blocks + GAP/FC, addressable by block position [stage, block]."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Position = tuple[int, int]  # (stage, block): stages count from 1, blocks from 0


class ResNet(nn.Module):
    """stem -> stages -> global average pool -> fc: images [B,3,H,W] -> logits [B,num_classes]."""

    def __init__(self, stem: nn.Module, stages: Sequence[Sequence[nn.Module]], num_features: int,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.fc = nn.Linear(num_features, num_classes)

    @property
    def layers(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(len(stage) for stage in self.stages)

    def positions(self) -> list[Position]:
        """Every block position in forward order."""
        return [(s + 1, b) for s, n in enumerate(self.layers) for b in range(n)]

    def block(self, position: Position) -> nn.Module:
        stage, index = position
        return self.stages[stage - 1][index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
