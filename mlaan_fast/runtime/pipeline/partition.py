"""Cutting a LocalModel's modules into P contiguous pipeline stages, from measured costs or evenly.

Stage p holds modules ``first..last``, the heads and LAMs of the windows that end there (the final
classifier on the last stage) and the EMA shadows its LAMs read. A module's cost is what its stage
spends on it in one step: its forward plus its window (heads, LAM, and the backward passes the
window's objective runs), measured on the real device by :func:`measure_module_costs`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Partition:
    """``ranges[p] = (first, last)`` modules of stage p, with the per-module costs it was cut from."""

    ranges: tuple[tuple[int, int], ...]
    costs: tuple[float, ...]
    measured: bool

    @property
    def num_stages(self) -> int:
        return len(self.ranges)

    def stage_of(self, module: int) -> int:
        """The stage that holds ``module``."""
        return next(p for p, (a, b) in enumerate(self.ranges) if a <= module <= b)

    def stage_costs(self) -> list[float]:
        return [sum(self.costs[a:b + 1]) for a, b in self.ranges]

    def shares(self) -> list[float]:
        """Each stage's share of one step's work."""
        total = sum(self.costs) or 1.0
        return [c / total for c in self.stage_costs()]

    def predicted_speedup(self, microbatches: int | None = None) -> float:
        """Step time of one process over the pipeline's: total / slowest stage, times the fill-and-drain
        factor n / (n + P - 1) of a synchronous pipeline of ``microbatches`` n (None: no flush, async)."""
        slowest = max(self.stage_costs()) or 1.0
        speedup = sum(self.costs) / slowest
        if microbatches is not None:
            speedup *= microbatches / (microbatches + self.num_stages - 1)
        return speedup

    def describe(self, microbatches: int | None = None) -> str:
        """Multi-line summary: the modules, predicted share of each stage, and the pipeline's efficiency."""
        how = "measured module costs" if self.measured else "an even split"
        lines = [f"pipeline: {self.num_stages} stages from {how}"]
        for p, ((a, b), share) in enumerate(zip(self.ranges, self.shares())):
            lines.append(f"  stage {p}: modules {a}..{b} ({b - a + 1}), {100 * share:.1f}% of the work")
        speedup = self.predicted_speedup(microbatches)
        mode = "async" if microbatches is None else f"sync, {microbatches} micro-batches"
        lines.append(f"  predicted ({mode}): {speedup:.2f}x one process, efficiency "
                     f"{100 * speedup / self.num_stages:.0f}% (communication not counted)")
        return "\n".join(lines)


def even_partition(num_modules: int, num_stages: int) -> Partition:
    """Stages of (nearly) equal numbers of modules."""
    _check(num_modules, num_stages)
    bounds = [round(p * num_modules / num_stages) for p in range(num_stages + 1)]
    ranges = tuple((bounds[p], bounds[p + 1] - 1) for p in range(num_stages))
    return Partition(ranges, tuple(1.0 for _ in range(num_modules)), measured=False)


def balanced_partition(costs: list[float], num_stages: int) -> Partition:
    """Contiguous stages minimising the slowest stage's total cost (exact, by dynamic programming)."""
    M = len(costs)
    _check(M, num_stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[p][m]: the smallest max stage cost of the first m modules in p stages; cut[p][m]: where the
    # last of those stages begins.
    best = [[inf] * (M + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (M + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for p in range(1, num_stages + 1):
        for m in range(p, M + 1):
            for k in range(p - 1, m):
                value = max(best[p - 1][k], prefix[m] - prefix[k])
                if value < best[p][m]:
                    best[p][m], cut[p][m] = value, k
    ranges, m = [], M
    for p in range(num_stages, 0, -1):
        k = cut[p][m]
        ranges.append((k, m - 1))
        m = k
    return Partition(tuple(reversed(ranges)), tuple(costs), measured=True)


def _check(num_modules: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"pipeline_stages: must be >= 1, got {num_stages}")
    if num_stages > num_modules:
        raise ValueError(f"pipeline_stages: {num_stages} stages for a model of {num_modules} modules; "
                         f"use at most {num_modules} (or a larger K)")


def measure_module_costs(model, images: torch.Tensor, targets: torch.Tensor, steps: int = 2) -> list[float]:
    """Seconds per module of one ``once`` step on ``images``' device: module m's forward plus window m
    (its heads, LAM and the backward passes its objective runs); the median of ``steps`` after one
    warm-up step. The gradients it leaves are zeroed; BatchNorm statistics are restored."""
    from mlaan_fast.models.schedule_once import OnceStep

    buffers = [b.clone() for b in model.buffers()]
    windows = {w.index: w for w in model.windows}
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    samples = []
    for _ in range(steps + 1):
        step = OnceStep(model, images, targets)
        costs, h = [], images
        with torch.enable_grad():
            for m in range(model.num_modules):
                sync()
                start = time.perf_counter()
                h = step.forward(m, h)
                if m in windows:
                    step.window(windows[m], h)
                sync()
                costs.append(time.perf_counter() - start)
        samples.append(costs)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    for p in model.parameters():
        p.grad = None
    samples = samples[1:]
    return [sorted(s[m] for s in samples)[len(samples) // 2] for m in range(model.num_modules)]
