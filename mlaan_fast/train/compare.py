"""What local learning buys: one training step of the run's network next to the same network trained
end to end, on the same batch (the digits demo ends with it; ``--compare-end-to-end`` elsewhere).

Both steps run eagerly in fp32 on the run's device: a model built from the run's settings and its
trained weights, and the end-to-end model of the same architecture (K = 1, one loss at the top).
Memory is the peak of tensors saved for backward during the step (``ActivationMeter``), the same
number the epoch lines show on a CPU; time is the median of a few steps, taken in alternation.
"""
from __future__ import annotations

import statistics
import time

import torch

from mlaan_fast.profiling import ActivationMeter
from mlaan_fast.train.metrics import format_bytes

TIMED_STEPS = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_peak(model, images, targets) -> int:
    """Peak bytes saved for backward by one ``local_step`` (gradients cleared afterwards)."""
    with ActivationMeter(exclude=model) as meter:
        model.local_step(images, targets)
    model.zero_grad(set_to_none=True)
    return meter.peak_bytes


def _step_s(model, images, targets) -> float:
    device = images.device
    _sync(device)
    start = time.perf_counter()
    model.local_step(images, targets)
    _sync(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def compare_with_end_to_end(local, end_to_end, images, targets) -> dict:
    """Saved-activation peak (bytes) and median step time (s) of ``local`` and ``end_to_end`` (both
    LocalModels in training mode, K >= 1 and K = 1) on images [B,3,H,W] / int64 targets [B]."""
    models = {"local": local, "end_to_end": end_to_end}
    result = {name: {"saved_bytes": _saved_peak(m, images, targets)} for name, m in models.items()}
    times = {name: [] for name in models}
    for _ in range(TIMED_STEPS):  # alternated, so a slower moment of the machine hits both
        for name, m in models.items():
            times[name].append(_step_s(m, images, targets))
    for name in models:
        result[name]["step_s"] = statistics.median(times[name])
    result["batch"] = int(images.shape[0])
    result["memory_ratio"] = result["local"]["saved_bytes"] / max(result["end_to_end"]["saved_bytes"], 1)
    result["time_ratio"] = result["local"]["step_s"] / result["end_to_end"]["step_s"]
    return result


def format_comparison(result: dict, method: str, K: int, arch: str, device: torch.device) -> str:
    """The comparison as a few lines for the end of a run."""
    rows = [("end to end (K=1)", result["end_to_end"]), (f"{method} (K={K})", result["local"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"one training step of the same batch ({result['batch']} images, {arch}, {device.type}, "
             "eager fp32):"]
    for name, r in rows:
        lines.append(f"  {name:<{width}}  saved activations {format_bytes(r['saved_bytes']):>10}  "
                     f"step {1000 * r['step_s']:6.0f} ms")
    lines.append(f"  {method} holds {result['memory_ratio']:.2f}x the activations of end-to-end training "
                 f"and takes {result['time_ratio']:.2f}x its step time")
    return "\n".join(lines)
