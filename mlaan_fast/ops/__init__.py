"""Fused operators of mlaan_fast and the backend switch that routes them."""
from mlaan_fast.ops._backend import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    forced_backend,
    select_backend,
    use_backend,
)
from mlaan_fast.ops.aux_head import aux_head_loss, target_checks
from mlaan_fast.ops.ema import ema_update_

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "forced_backend",
    "select_backend",
    "use_backend",
    "ema_update_",
    "aux_head_loss",
    "target_checks",
]
