"""Multi-tensor EMA update: shadow <- decay * shadow + (1 - decay) * live (MLAAN's leap parameters).

Backends: ``reference`` (``torch._foreach_lerp_``), ``cpu`` and ``cuda`` (``torch.ops.mlaan_fast.ema_update_``,
inputs checked in C++), ``triton`` (one launch, inputs checked here).
"""
from __future__ import annotations

import numbers

import torch

from mlaan_fast.ops._backend import load_extension, select_backend

# On CUDA tensors the C++ pointer-table kernel goes first: it uses 16-byte vector accesses
# where pointers allow and builds its table without Python; the Triton list form cannot prove
# alignment of table-loaded pointers. The GPU benchmark (benchmarks/bench_ema.py) checks this.
GPU_ORDER = ("cuda", "triton")

_LIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(shadow, live, decay) -> None:
    """The checks of csrc/ema_cpu.cpp, for the paths that do not go through C++."""
    _check_elements(shadow, "shadow")
    _check_elements(live, "live")
    if len(shadow) != len(live):
        raise ValueError(f"ema_update_: shadow has {len(shadow)} tensors but live has {len(live)}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1], got {decay}")
    if not shadow:
        return
    device = shadow[0].device
    for i, (s, t) in enumerate(zip(shadow, live)):
        if s.device != device:
            raise ValueError(f"ema_update_: shadow[{i}] is on {s.device} but shadow[0] is on {device} "
                             "(all tensors must be on one device)")
        if t.device != device:
            raise ValueError(f"ema_update_: live[{i}] is on {t.device} but shadow[0] is on {device} "
                             "(all tensors must be on one device)")
        if s.dtype != torch.float32:
            raise TypeError(f"ema_update_: shadow[{i}] must be float32, got {s.dtype}")
        if t.dtype not in _LIVE_DTYPES:
            raise TypeError(f"ema_update_: live[{i}] must be float32, bfloat16 or float16, got {t.dtype}")
        if s.shape != t.shape:
            raise ValueError(f"ema_update_: shape mismatch at index {i}: shadow[{i}] has shape "
                             f"{list(s.shape)} but live[{i}] has shape {list(t.shape)}")
        if not s.is_contiguous():
            raise ValueError(f"ema_update_: shadow[{i}] must be contiguous (it is updated in place)")


def _check_list(x, name: str) -> None:
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"ema_update_: {name} must be a list or tuple of tensors, got {type(x).__name__}")


def _check_elements(x, name: str) -> None:
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ema_update_: {name}[{i}] must be a tensor, got {type(t).__name__}")


def _reference(shadow, live, decay: float) -> None:
    live = [t if t.dtype == s.dtype else t.to(s.dtype) for s, t in zip(shadow, live)]
    torch._foreach_lerp_(shadow, live, 1.0 - decay)


def _triton(shadow, live, decay: float) -> None:
    from mlaan_fast.triton import ema as triton_ema

    if len(shadow) == 1:
        triton_ema.ema_update_flat(shadow[0].view(-1), live[0].reshape(-1), decay)
    else:
        triton_ema.ema_update_list(shadow, live, decay)


def ema_update_(shadow: list[torch.Tensor], live: list[torch.Tensor], decay: float) -> None:
    """In place, for every i: shadow[i] (fp32) <- decay*shadow[i] + (1-decay)*live[i] (fp32/bf16/fp16)."""
    _check_list(shadow, "shadow")
    _check_list(live, "live")
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"ema_update_: decay must be a float, got {type(decay).__name__}")
    decay = float(decay)
    if not shadow and not live:
        return
    first = (shadow or live)[0]
    if not isinstance(first, torch.Tensor):
        _check_elements(shadow, "shadow")
        _check_elements(live, "live")
    backend = select_backend("ema_update_", first.device, gpu_order=GPU_ORDER)
    with torch.no_grad():
        if backend in ("cpu", "cuda"):
            try:
                torch.ops.mlaan_fast.ema_update_(shadow, live, decay)
            except (TypeError, RuntimeError):
                # A non-tensor element fails in the schema parser: name its index instead.
                _check_elements(shadow, "shadow")
                _check_elements(live, "live")
                raise
            return
        _check_inputs(shadow, live, decay)
        if backend == "triton":
            _triton(shadow, live, decay)
        else:
            _reference(shadow, live, decay)


def _register_fake() -> None:
    if load_extension()[0] is None:
        return

    @torch.library.register_fake("mlaan_fast::ema_update_")
    def _ema_update_fake(shadow, live, decay):
        _check_inputs(shadow, live, decay)


_register_fake()
