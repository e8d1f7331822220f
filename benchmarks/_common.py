"""Shared benchmark plumbing: device naming, timing, CSV rows.

Rows follow `kernels.md`: op, provider, shape, metric, unit, p50, p20, p80, device, torch,
triton, commit, date (plus free-form `note`). GPU timings use CUDA events through
`triton.testing.do_bench`; CPU timings are wall-clock medians of repeated calls, interleaved
across the compared callables where a benchmark asks (`bench_interleaved`).
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import subprocess
import time

import torch

FIELDS = ["op", "provider", "shape", "metric", "unit", "p50", "p20", "p80",
          "device", "torch", "triton", "commit", "date", "note"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device, 'CPU (<processor>, N threads)' otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine()
    return f"CPU ({proc}, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "none"


def bench(fn, device, *, warmup_ms: float = 25, rep_ms: float = 100,
          min_reps: int = 5) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()``: CUDA events via do_bench on GPU, wall clock on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return float(p50), float(p20), float(p80)
    fn()  # warm-up (first-call allocations, lazy init)
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def bench_interleaved(fns: dict, *, rep_ms: float = 300, min_reps: int = 5, block: int = 10) -> dict:
    """{name: (p50, p20, p80) ms} of each CPU callable, wall clock, in rounds of ``block`` calls each.

    Rounds spread a slower or faster spell of a shared machine over every callable; the first call
    of each block is not kept (it pays for the switch from the previous callable: caches and
    whatever that callable left running)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    t_end = time.perf_counter() + rep_ms / 1e3
    while min(map(len, times.values()), default=min_reps) < min_reps or time.perf_counter() < t_end:
        for name, fn in fns.items():
            for i in range(block + 1):
                t0 = time.perf_counter()
                fn()
                if i:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(ts) for name, ts in times.items()}


def _quantiles(times: list) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return statistics.median(times), q[1], q[7]


def copy_bandwidth_gbs(device, numel: int = 1 << 26) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written) for a ``numel`` fp32 copy."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    p50, _, _ = bench(lambda: dst.copy_(src), device)
    return 2 * numel * 4 / (p50 * 1e-3) / 1e9


class CsvWriter:
    """Appends benchmark rows to ``results/<name>.csv`` (header written once) and keeps them."""

    def __init__(self, name: str, device, out_dir: str | None = None):
        self.path = os.path.join(out_dir or RESULTS_DIR, f"{name}.csv")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.common = {"device": device_name(device), "torch": torch.__version__, "triton": triton_version(),
                       "commit": git_commit(), "date": _dt.date.today().isoformat()}
        self.rows: list[dict] = []

    def add(self, op, provider, shape, metric, unit, p50, p20=None, p80=None, note="") -> dict:
        row = {"op": op, "provider": provider, "shape": shape, "metric": metric, "unit": unit,
               "p50": _fmt(p50), "p20": _fmt(p20), "p80": _fmt(p80), "note": note, **self.common}
        self.rows.append(row)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
        return row


def _fmt(x):
    if x is None:
        return ""
    return f"{x:.6g}" if isinstance(x, float) else str(x)
