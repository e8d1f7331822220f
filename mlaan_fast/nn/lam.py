"""LAM (leap augmented module): trainable copies of downstream blocks, the first one augmented by a
frozen EMA shadow."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LAM(nn.Module):
    """z -> blocks[0](z) + shadow(z) -> blocks[1](.) -> ... -> blocks[-1](.).

    ``blocks`` are owned, trainable modules (deep copies of backbone blocks). The shadow is
    ``shadow_bank.shadows[shadow_index]`` (e.g. an :class:`EMAShadow`), referenced and not owned:
    several LAMs may share one shadow, and whoever owns the bank updates it. The shadow's
    parameters are frozen; gradient still flows through it to ``z``.
    """

    def __init__(self, blocks: Sequence[nn.Module], shadow_bank: nn.Module | None = None,
                 shadow_index: int = 0):
        super().__init__()
        if len(blocks) == 0:
            raise ValueError("LAM: blocks must hold at least one block")
        self.blocks = nn.ModuleList(blocks)
        self._bank = [shadow_bank]  # a list keeps the bank out of this module's parameters and state
        self.shadow_index = shadow_index

    @property
    def shadow(self) -> nn.Module | None:
        bank = self._bank[0]
        return None if bank is None else bank.shadows[self.shadow_index]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,C,H,W] (a module's output) -> [B,C',H',W'] (the last copied block's output)."""
        out = self.blocks[0](z)
        shadow = self.shadow
        if shadow is not None:
            out = out + shadow(z)
        for block in self.blocks[1:]:
            out = block(out)
        return out

    def extra_repr(self) -> str:
        return "shadow=none" if self._bank[0] is None else f"shadow_index={self.shadow_index}"
