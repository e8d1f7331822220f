"""Multi-tensor EMA update: shadow <- decay * shadow + (1 - decay) * live (MLAAN's leap parameters)."""
from __future__ import annotations

import torch

from mlaan_fast.ops._backend import select_backend


def _check(shadow, live, decay):
    if not isinstance(shadow, (list, tuple)) or not isinstance(live, (list, tuple)):
        raise TypeError("ema_update_: shadow and live must be lists of tensors")
    if len(shadow) != len(live):
        raise ValueError(f"ema_update_: {len(shadow)} shadow tensors but {len(live)} live tensors")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")


def ema_update_(shadow: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """In place, for every i: shadow[i] (fp32) <- decay*shadow[i] + (1-decay)*live[i] (fp32/bf16/fp16)."""
    _check(shadow, live, decay)
    if len(shadow) == 0:
        return
    select_backend("ema_update_", shadow[0].device)
    with torch.no_grad():
        torch._foreach_lerp_(list(shadow), [t.to(s.dtype) for s, t in zip(shadow, live)], 1.0 - float(decay))
