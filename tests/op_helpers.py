"""What the fused-op tests share: which backends run here (as skip marks), and aux-head inputs."""
from __future__ import annotations

import pytest
import torch

from mlaan_fast.ops import available_backends
from mlaan_fast.ops._backend import triton_interpreted

AVAILABLE = available_backends()
HAS_CPP = AVAILABLE["cpu"][0]
TRITON_ON_CPU = AVAILABLE["triton"][0] and not torch.cuda.is_available()
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {AVAILABLE['cpu'][1]}")
needs_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU,
                                      reason=f"Triton interpreter unavailable: {AVAILABLE['triton'][1]}")
_MARKS = {"cpu": needs_cpp, "triton": needs_triton_cpu, "reference": ()}
CPU_BACKENDS = ("reference", "cpu", "triton")
GPU_BACKENDS = ("cuda", "triton")


def backends(*names):
    """pytest params of the CPU-tensor backends ``names``, each skipped where it cannot run."""
    return [pytest.param(n, marks=_MARKS[n]) for n in names]


def usable_on(name: str, device: str) -> bool:
    """Whether backend ``name`` runs on tensors of ``device`` here."""
    if not AVAILABLE[name][0]:
        return False
    if name in ("cpu", "cuda"):
        return name == device
    if name == "triton":
        return (device == "cpu") == triton_interpreted()
    return True


def make_features(B, C, H, W, layout, dtype=torch.float32, device="cpu", scale=1.0):
    """Random features in the given layout: nchw, channels_last, noncontig (a strided view) or flat [B, C]."""
    if layout == "flat":
        return torch.randn(B, C, dtype=dtype, device=device) * scale
    if layout == "noncontig":
        base = torch.randn(B, C, 2 * H, W + 3, dtype=dtype, device=device) * scale
        x = base[:, :, ::2, 1:W + 1].transpose(2, 3).transpose(2, 3)
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x
    x = torch.randn(B, C, H, W, dtype=dtype, device=device) * scale
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_inputs(B, C, H, W, N, layout, *, bias=True, dtype=torch.float32, device="cpu"):
    """(features, weight, bias or None, target) of an aux-head call; the floating ones require grad."""
    x = make_features(B, C, H, W, layout, dtype, device).requires_grad_()
    w = (torch.randn(N, C, dtype=dtype, device=device) / C ** 0.5).requires_grad_()
    b = (torch.randn(N, dtype=dtype, device=device) * 0.1).requires_grad_() if bias else None
    t = torch.randint(0, N, (B,), device=device)
    return x, w, b, t


def with_bad_target(B=6, C=8, N=5, bad_index=2, bad_value=5):
    """make_inputs (channels_last, 3x3) with target[bad_index] = bad_value."""
    x, w, b, t = make_inputs(B, C, 3, 3, N, "channels_last")
    t = t.clone()
    t[bad_index] = bad_value
    return x, w, b, t
