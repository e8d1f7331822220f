"""Comparisons of tensors that the code under test and its reference sum in different orders.

A gradient, a BatchNorm statistic or a weight after a few SGD steps is a sum of many terms. Two
correct computations that add them in another order (two schedules, a fused kernel and its
reference, a threaded kernel on a busy machine) agree to a few units of rounding *of the
tensor's largest terms*, so an element that is itself near zero can differ from its counterpart
by far more than its own size. Such tensors are compared with a tolerance scaled to the tensor's
magnitude: |got - want| <= rtol * max|want| + atol, element by element.

Set ``MLAAN_TEST_TOLERANCE_LOG=FILE`` to append, for every comparison, the largest relative
difference it saw (one JSON line each): that is how the tolerances below were checked.
"""
from __future__ import annotations

import json
import os

import torch

# rtol relative to max|want|: a few hundred units of rounding of the dtype, far below any real
# error (a wrong term in a sum moves it by a fraction of its largest element).
SCALED_RTOL = {torch.float64: 1e-12, torch.float32: 3e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def scaled_difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """(max |got - want|, max |want|, index of the worst element) in float64."""
    diff = (got.detach().double() - want.detach().double()).abs()
    worst = int(diff.argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape)) if diff.dim() else ()
    scale = want.detach().double().abs().max().item() if want.numel() else 0.0
    return (diff.max().item() if diff.numel() else 0.0), scale, index


def _log(name: str, rel: float) -> None:
    path = os.environ.get("MLAAN_TEST_TOLERANCE_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "tensor": name, "rel": rel}) + "\n")


def mismatch(got: torch.Tensor, want: torch.Tensor, *, rtol: float | None = None, atol: float = 0.0,
             name: str = "tensor") -> str | None:
    """None if |got - want| <= rtol * max|want| + atol everywhere, else a line naming the worst element."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{name}: {got.dtype} {tuple(got.shape)} vs {want.dtype} {tuple(want.shape)}"
    rtol = SCALED_RTOL[want.dtype] if rtol is None else rtol
    diff, scale, index = scaled_difference(got, want)
    if diff != diff:  # NaN somewhere
        return f"{name}: NaN in the difference"
    _log(name, diff / scale if scale else diff)
    if diff <= rtol * scale + atol:
        return None
    g, w = got.flatten()[_flat(index, got)].item(), want.flatten()[_flat(index, want)].item()
    return (f"{name}: max |diff| {diff:.3e} at {list(index)} (got {g:.6e}, "
            f"want {w:.6e}); tensor scale max|want| {scale:.3e}, "
            f"relative {diff / scale if scale else float('inf'):.2e} > rtol {rtol:.1e}")


def _flat(index: tuple[int, ...], t: torch.Tensor) -> int:
    flat = 0
    for i, n in zip(index, t.shape):
        flat = flat * n + i
    return flat


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, *, rtol: float | None = None,
                        atol: float = 0.0, name: str = "tensor") -> None:
    """Assert |got - want| <= rtol * max|want| + atol (rtol from the dtype unless given)."""
    problem = mismatch(got, want, rtol=rtol, atol=atol, name=name)
    assert problem is None, problem


def assert_all_close_scaled(got: dict, want: dict, *, rtol: float | None = None, atol: float = 0.0) -> None:
    """Every tensor of two name -> tensor (or None) dicts, each scaled to its own magnitude."""
    assert got.keys() == want.keys(), f"different names: {sorted(set(got) ^ set(want))[:5]}"
    bad = []
    for name in want:
        g, w = got[name], want[name]
        if (g is None) != (w is None):
            bad.append(f"{name}: present in one of them only")
        elif g is not None:
            problem = mismatch(g, w, rtol=rtol, atol=atol, name=name)
            if problem:
                bad.append(problem)
    assert not bad, f"{len(bad)} tensor(s) differ:\n" + "\n".join(bad[:10])
