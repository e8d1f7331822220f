"""pytest-benchmark entry to the benchmarks: the ``test_*`` functions at the end of each
``bench_*.py`` time the same steps that script builds for its CSV rows (the README tables stay
the scripts'). pytest-benchmark keeps runs, so a change can be compared with the last commit:

    python -m pytest benchmarks --benchmark-only                         # quick sizes
    python -m pytest benchmarks --benchmark-only --benchmark-autosave    # keep this run (.benchmarks/)
    python -m pytest benchmarks --benchmark-only --benchmark-compare     # compare with the last kept run
    python -m pytest benchmarks --benchmark-only --bench-full --bench-device cuda   # the scripts' sizes

Without ``--benchmark-only`` (as in the README's test command) the quick CPU sizes run too, timed
briefly, so that the suites cannot rot unnoticed.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    group = parser.getgroup("mlaan_fast benchmarks")
    group.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                    help="device of the benchmarks (default: cuda if available, else cpu)")
    group.addoption("--bench-full", action="store_true",
                    help="the CSV scripts' sizes instead of the quick ones")


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    name = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return torch.device(name)


@pytest.fixture(scope="session")
def bench_full(request) -> bool:
    return request.config.getoption("--bench-full")


QUICK_ROUNDS = 10


@pytest.fixture
def timed(benchmark, bench_device, bench_full):
    """timed(fn, rounds=None): fn timed by pytest-benchmark, each call followed by a device sync on
    CUDA (the time is the device's work plus the host's, as the CSV scripts' non-graph rows).
    Quick sizes: ``rounds`` calls (QUICK_ROUNDS unless given) after one warm-up; full sizes:
    pytest-benchmark's own calibration, unless ``rounds`` is given."""

    def run(fn, rounds: int | None = None):
        if bench_device.type == "cuda":
            def call():
                fn()
                torch.cuda.synchronize(bench_device)
        else:
            call = fn
        if rounds is None and not bench_full:
            rounds = QUICK_ROUNDS
        if rounds is None:
            return benchmark(call)
        return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)

    return run
