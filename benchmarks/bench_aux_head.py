"""Benchmark the fused auxiliary-head loss (GAP -> Linear -> cross-entropy), forward + backward.

Providers: ``eager`` (AdaptiveAvgPool2d -> Flatten -> Linear -> CrossEntropy in PyTorch),
``compile`` and ``compile-max-autotune`` (torch.compile of that composition), and ours
(``cuda``, ``triton`` on GPU; ``cpu`` on CPU), each also as ``<backend>-nocheck``: the same
kernels with ``check_target=False`` (no target-range check, so no host sync on a GPU, as a
trainer that validated its labels calls it). On a GPU, ``eager-graph``, ``cuda-graph`` and
``triton-graph`` replay the whole step from a CUDA graph: no host work, so they time the
kernels alone (the bandwidth the kernels reach), while the others time what a Python caller
waits for, host work included (on an H200 these steps took 0.5-1.4 ms for feature traffic that
copy bandwidth moves in 8-33 us).

Shapes: CIFAR ResNet module outputs at batch 1024 on a GPU, B=256 C=64 8x8 on the CPU, and on
both the ImageNet head at batch 256 and a tiny ``host`` shape (B=2, C=16, 1x1) whose time is
almost all host overhead (Python, dispatcher, autograd, launches).

Rows go to ``results/aux_head.csv``: time (p50/p20/p80 ms), peak memory above the inputs (GPU:
torch.cuda.max_memory_allocated), GB/s of the feature read + gradient write against measured
copy bandwidth, and the ratio of each of ours to every baseline of its kind.

    python benchmarks/bench_aux_head.py [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import CsvWriter, bench, bench_interleaved, copy_bandwidth_gbs, device_name  # noqa: E402
from mlaan_fast.ops import aux_head_loss, available_backends, use_backend  # noqa: E402

# (B, C, H, W, N): CIFAR ResNet module outputs at batch 1024, ImageNet ResNet head at batch 256;
# HOST_SHAPE: so small that a step's time is the host's.
HOST_SHAPE = (2, 16, 1, 1, 10)
GPU_SHAPES = [(1024, 16, 32, 32, 10), (1024, 32, 16, 16, 10), (1024, 64, 8, 8, 10), HOST_SHAPE,
              (256, 512, 7, 7, 1000)]
CPU_SHAPES = [(256, 64, 8, 8, 10), HOST_SHAPE, (256, 512, 7, 7, 1000)]
BASELINES = ("eager", "compile", "compile-max-autotune")
GRAPH_BASELINES = ("eager-graph",)


def composition(x, w, b, t):
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.cross_entropy(F.linear(pooled, w, b), t)


def make_step(loss_fn, x, w, b, t, backend=None):
    def step():
        with use_backend(backend):
            loss = loss_fn(x, w, b, t)
        return torch.autograd.grad(loss, (x, w, b))

    return step


def peak_extra_bytes(step, device):
    """Peak bytes allocated above what was live before the step (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def graphed(step):
    """A callable that replays ``step`` (forward + backward) from a CUDA graph: device time only."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture (lazy init, allocator, autotuning)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def build_steps(shape, device, dtype, layout, quick, providers=None):
    """({provider: step}, [our providers], features, label) of one shape: every provider that can
    run on ``device`` (``providers``: only these). A step is one forward + backward."""
    B, C, H, W, N = shape
    label = f"B{B}-C{C}-{H}x{W}-N{N}-{str(dtype).replace('torch.', '')}-{layout}"
    x = torch.randn(B, C, H, W, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = (torch.randn(N, C, device=device) / C ** 0.5).requires_grad_()
    b = torch.zeros(N, device=device, requires_grad=True)
    t = torch.randint(0, N, (B,), device=device)

    def wanted(name):
        return not providers or name in providers

    steps = {"eager": make_step(composition, x, w, b, t)}
    if not (quick and device.type == "cpu"):
        if wanted("compile"):
            steps["compile"] = make_step(torch.compile(composition), x, w, b, t)
        if wanted("compile-max-autotune"):
            autotuned = torch.compile(composition, mode="max-autotune-no-cudagraphs")
            steps["compile-max-autotune"] = make_step(autotuned, x, w, b, t)
    avail = available_backends()
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    unchecked = functools.partial(aux_head_loss, check_target=False)
    ours = []
    for name in backends:
        if avail[name][0]:
            steps[name] = make_step(aux_head_loss, x, w, b, t, backend=name)
            steps[f"{name}-nocheck"] = make_step(unchecked, x, w, b, t, backend=name)
            ours += [name, f"{name}-nocheck"]
        else:
            print(f"  {name}: unavailable ({avail[name][1]})")
    if device.type == "cuda":
        # Graph capture skips the target check (no host sync may happen inside a capture).
        for name in ["eager"] + [n for n in backends if avail[n][0]]:
            if not wanted(f"{name}-graph"):
                continue
            try:
                steps[f"{name}-graph"] = graphed(steps[f"{name}-nocheck" if name != "eager" else name])
            except Exception as exc:
                print(f"  {name}-graph: capture failed ({type(exc).__name__}: {exc})")
                continue
            if name != "eager":
                ours.append(f"{name}-graph")
    if providers:
        steps = {k: v for k, v in steps.items() if k in providers}
    return steps, ours, x, label


def run_shape(shape, device, dtype, layout, writer, copy_gbs, quick, providers=None, profile=False):
    steps, ours, x, label = build_steps(shape, device, dtype, layout, quick, providers)
    rep_ms = 60 if quick else 300
    ready = {}
    for name, step in steps.items():
        try:
            step()  # compile / warm up
            ready[name] = step
        except Exception as exc:  # a failing baseline is reported, not fatal
            print(f"  {name}: failed ({type(exc).__name__}: {exc})")
            writer.add("aux_head_loss", name, label, "fwd+bwd", "ms", float("nan"),
                       note=f"failed: {type(exc).__name__}")
    if device.type == "cuda":
        quantiles = {name: bench(step, device, warmup_ms=25, rep_ms=rep_ms) for name, step in ready.items()}
    else:
        # Round-robin on the CPU, so that a slower or faster spell of a shared machine reaches every provider.
        quantiles = bench_interleaved(ready, rep_ms=rep_ms * len(ready))
    times = {}
    feature_bytes = 2 * x.numel() * x.element_size()
    for name, (p50, p20, p80) in quantiles.items():
        times[name] = p50
        gbs = feature_bytes / (p50 * 1e-3) / 1e9
        writer.add("aux_head_loss", name, label, "fwd+bwd", "ms", p50, p20, p80)
        writer.add("aux_head_loss", name, label, "feature_read_write", "GB/s", gbs,
                   note=f"{100 * gbs / copy_gbs:.1f}% of measured copy bandwidth {copy_gbs:.0f} GB/s")
        # A replay allocates nothing (its memory is the graph's pool): no peak row for graphs.
        peak = None if name.endswith("-graph") else peak_extra_bytes(ready[name], device)
        if peak is not None:
            writer.add("aux_head_loss", name, label, "peak_memory_above_inputs", "MiB", peak / 2 ** 20,
                       note="torch.cuda.max_memory_allocated minus memory_allocated before the step")
        print(f"  {name:>22}: {p50:8.3f} ms  ({p20:.3f}-{p80:.3f})  {gbs:7.1f} GB/s"
              + (f"  peak +{peak / 2 ** 20:.1f} MiB" if peak is not None else ""))
    if profile and device.type == "cuda":
        for name in ours:
            if name in steps and not name.endswith("-graph"):
                print_kernel_times(name, steps[name])
    for name in ours:
        if name not in times:
            continue
        for base in GRAPH_BASELINES if name.endswith("-graph") else BASELINES:
            if base in times:
                ratio = times[base] / times[name]
                writer.add("aux_head_loss", name, label, f"speedup_vs_{base}", "x", ratio)
                print(f"  {name} vs {base}: {ratio:.2f}x")


def print_kernel_times(name, step, iters=20):
    """Per-kernel CUDA time of one step, from the profiler (for finding the slow piece)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    print(f"  kernels of {name} (mean per step over {iters} steps):")
    for ev in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"    {ev.device_time_total / iters:9.1f} us  x{ev.count // iters}  {ev.key[:90]}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short timing; on CPU skip the compiled baselines")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for aux_head.csv (default benchmarks/results)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--layout", choices=["nchw", "channels_last"], default="nchw")
    parser.add_argument("--providers", default="", help="comma list to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="print per-kernel CUDA times of ours")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds; no shape is started once they are spent "
                             "(shapes run in order of importance)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    writer = CsvWriter("aux_head", device, args.out)
    copy_gbs = copy_bandwidth_gbs(device, numel=1 << (26 if device.type == "cuda" else 23))
    print(f"aux_head_loss fwd+bwd on {device_name(device)}; copy bandwidth {copy_gbs:.1f} GB/s")
    writer.add("copy", "torch", "fp32", "bandwidth", "GB/s", copy_gbs)
    for shape in GPU_SHAPES if device.type == "cuda" else CPU_SHAPES:
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            print(f"budget of {args.budget:.0f}s spent: shape {shape} not measured")
            continue
        print(f"shape B,C,H,W,N = {shape}")
        run_shape(shape, device, dtype, args.layout, writer, copy_gbs, args.quick,
                  providers=[p for p in args.providers.split(",") if p], profile=args.profile)
    print(f"rows appended to {writer.path}")


# --- pytest-benchmark (benchmarks/conftest.py): the steps above, one test per shape and provider ----

QUICK_SHAPES = {"cpu": [(64, 64, 8, 8, 10), HOST_SHAPE], "cuda": [(1024, 64, 8, 8, 10), HOST_SHAPE]}


def pytest_generate_tests(metafunc):
    if "aux_head_case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    full = metafunc.config.getoption("--bench-full")
    shapes = (GPU_SHAPES if device == "cuda" else CPU_SHAPES) if full else QUICK_SHAPES[device]
    providers = ["eager"] + (["compile"] if full else [])
    providers += ["cuda", "cuda-nocheck", "triton", "triton-nocheck", "eager-graph", "cuda-graph",
                  "triton-graph"] if device == "cuda" else ["cpu", "cpu-nocheck"]
    cases = [(shape, p) for shape in shapes for p in providers]
    metafunc.parametrize("aux_head_case", cases, ids=[f"{'x'.join(map(str, s))}-{p}" for s, p in cases])


def test_aux_head_loss(aux_head_case, timed, bench_device, bench_full):
    """Forward + backward of one provider at one shape (fp32, NCHW)."""
    import pytest

    shape, provider = aux_head_case
    backend = provider.split("-")[0]
    if backend in ("cpu", "cuda", "triton") and not available_backends()[backend][0]:
        pytest.skip(f"{backend}: {available_backends()[backend][1]}")
    steps, _, _, _ = build_steps(shape, bench_device, torch.float32, "nchw", not bench_full, [provider])
    step = steps[provider]
    step()  # warm-up: compilation, lazy initialisation
    timed(step)


if __name__ == "__main__":
    main()
