"""One training step of every method, timed and weighed: the claims of mlaan_fast in numbers.

A step is ``model.local_step`` (every local forward/backward of the iteration) + one SGD step
(Nesterov, ``foreach``) + the EMA update of the leap-parameter shadows. Variants:

* ``straightforward``: the model run the way the public reference runs it: s+1 module forwards
  per iteration (``schedule="straightforward"``), unfused heads (``fused=False``), one shadow per
  LAM (``share_shadows=False``) and the EMA as a Python loop over parameter pairs
  (``p.data = p.data * m + q.data * (1 - m)``), eager.
* ``fused``: the same schedule with the fused ops: fused heads, shared shadows, one multi-tensor
  EMA launch (``model.update_shadows()``).
* ``scheduled``: ``fused`` plus the forward-once window scheduler (``schedule="once"``); only for
  methods with cascade windows.
* ``compiled``: ``scheduled`` (``fused`` for methods without cascade windows) with every
  backbone module, LAM and auxiliary head compiled by ``torch.compile`` (default backend, inductor;
  ``LocalModel.compile_modules``); for e2e and the methods with cascade windows, and only for the
  first (arch, K) pair, measured last (see :func:`plan`). ``compile_time`` is the wall time of its
  first step less the median timed step; the timed steps compile nothing (checked).
* ``graphed`` (GPU only): ``scheduled`` with ``overlap=True`` (heads on a second stream) and the
  whole ``local_step`` replayed from a CUDA graph (:class:`mlaan_fast.runtime.GraphedLocalStep`);
  for e2e and the methods with cascade windows. Its memory numbers are those of an eager step
  (a replay saves no tensors through autograd); the timed steps are replays.

Time per step: on a GPU back to back with CUDA events, one configuration after another; on the
CPU by wall clock, the variants of one method built first and then stepped in turn, so that a
shared machine's drift in speed reaches each of them alike.

Memory, per configuration (one extra untimed step):

* ``act_peak``: :class:`mlaan_fast.profiling.ActivationMeter` peak of bytes saved for backward
  (parameters and buffers excluded), the device-independent number;
* ``cuda_max_allocated`` (GPU): ``torch.cuda.max_memory_allocated`` over that step, everything the
  allocator held (weights, gradients, optimizer state, activations, workspaces);
* ``total_memory``: parameters + gradients + optimizer state + buffers (EMA shadows included),
  each storage counted once, + ``act_peak``.

Rows go to ``<out>/train_step.csv`` (op="train_step", provider="<method>/<variant>",
shape="<arch> K=<K> B=<B> <dtype>"); ratios (``step_time_vs_e2e``, ``speedup_vs_straightforward``)
are rows too, always between numbers of this process on this device. End-to-end has K=1.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import CsvWriter, device_name  # noqa: E402
from mlaan_fast.profiling import ActivationMeter  # noqa: E402

# The (arch, K) pairs, most telling first so a short budget still covers the claims.
CONFIGS = [("resnet32", 16), ("resnet110", 55), ("resnet32", 8), ("resnet110", 32)]
METHODS = ["e2e", "mlaan", "dgl+mlaan", "infopro+mlaan", "dgl", "infopro"]
VARIANTS = ["straightforward", "fused", "scheduled", "compiled", "graphed"]
VARIANT_OPTIONS = {
    "straightforward": dict(schedule="straightforward", fused=False, share_shadows=False),
    "fused": dict(schedule="straightforward", fused=True, share_shadows=True),
    "scheduled": dict(schedule="once", fused=True, share_shadows=True),
    "compiled": dict(schedule="once", fused=True, share_shadows=True),
    "graphed": dict(schedule="once", fused=True, share_shadows=True),
}
EAGER_TWIN = {"compiled": ("scheduled", "fused")}  # the eager variant a compiled step is compared with
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
MIB = 2.0**20


class BudgetSpent(Exception):
    """The budget ran out inside a configuration: it is dropped, nothing of it is written."""


class Budget:
    """Wall-clock allowance for the whole run; ``left()`` seconds remain (inf without a budget)."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.perf_counter()

    def check(self) -> None:
        if self.left() <= 0:
            raise BudgetSpent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(batch_size: int, device: torch.device, seed: int = 0):
    """CIFAR-shaped normalised images [B,3,32,32] (pixels uniform in [0,1]) and labels [B]."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(batch_size, 3, 32, 32, generator=g)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    images = ((pixels - mean) / std).to(device)
    targets = torch.randint(0, 10, (batch_size,), generator=g).to(device)
    return images, targets


def _shadows(model):
    from mlaan_fast.nn import EMAShadow

    return [m for m in model.modules() if isinstance(m, EMAShadow)]


def _loop_ema(shadows):
    """The reference's EMA, parameter by parameter: ``p.data = p.data * m + q.data * (1 - m)``.

    Three kernels and three allocations per shadow parameter. Re-binding ``.data`` detaches the
    shadow parameters from the EMAShadow's flat buffer (left stale and unused, and not counted by
    :func:`state_bytes`); the shadow modules read their parameters, so the training is unchanged.
    """
    pairs = [
        (shadow.decay, s, q) for shadow in shadows for s, q in zip(shadow.views(), shadow.live_parameters())
    ]

    def update():
        with torch.no_grad():
            for m, s, q in pairs:
                s.data = s.data * m + q.data * (1.0 - m)

    return update


def build(arch: str, K: int, method: str, variant: str, device: torch.device):
    """The model (or a reason it cannot be built) and its step function's EMA update."""
    from mlaan_fast.models import build_model

    model = build_model(
        arch, num_classes=10, K=1 if method == "e2e" else K, method=method, **VARIANT_OPTIONS[variant]
    )
    model = model.to(device).train()
    if variant == "compiled":
        model.compile_modules()
    if variant == "straightforward":
        ema = _loop_ema(_shadows(model))
    else:
        ema = model.update_shadows
    return model, ema


def make_step(model, ema, images, targets, autocast_dtype, device, graphed=False):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)
    # As the trainer runs it: labels checked on the host (no device sync), autocast applied by the step.
    from mlaan_fast.runtime import make_step as runtime_step

    local_step = runtime_step(model, overlap=graphed, amp_dtype=autocast_dtype, check_targets=False,
                              cuda_graphs=graphed)
    autocast = nullcontext

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = local_step(images, targets)
        optimizer.step()
        ema()
        return out

    step.local_step = local_step
    return step, optimizer


def state_bytes(model, optimizer) -> int:
    """Bytes of parameters, gradients, optimizer state and buffers, each storage once.

    Frozen EMA shadows count once through their parameters; a shadow bank's flat buffer no
    parameter points into any more (the straightforward variant's re-binding) is not counted.
    """
    shadows = _shadows(model)
    params = [p for m in model.modules() for p in m.parameters(recurse=False)]  # frozen shadows too
    tensors = params + [p.grad for p in params if p.grad is not None]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    used = {_key(t) for t in params}
    flats = {_key(s.flat) for s in shadows}
    tensors += [b for b in model.buffers() if _key(b) not in flats or _key(b) in used]
    seen, total = set(), 0
    for t in tensors:
        if _key(t) not in seen:
            seen.add(_key(t))
            total += t.untyped_storage().nbytes()
    return total


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def time_steps(
    step, device, budget, *, warmup: int, reps: int, min_reps: int, max_seconds: float
) -> list[float]:
    """Milliseconds per step, back to back (CUDA events on GPU, wall clock on CPU).

    Stops at ``reps`` steps, or after ``max_seconds`` once ``min_reps`` are done, or when the budget
    is spent once one step is timed.
    """
    for _ in range(warmup):
        budget.check()
        step()
    _sync(device)
    times: list[float] = []
    t_end = time.perf_counter() + max_seconds
    while len(times) < reps and (len(times) < min_reps or time.perf_counter() < t_end):
        if times and budget.left() <= 0:
            break
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def prepare(arch, K, method, variant, dtype_name, args, device, budget):
    """Build one configuration and weigh it (two untimed steps): (step, numbers without times)."""
    torch.manual_seed(0)
    model, ema = build(arch, K, method, variant, device)
    images, targets = _batch(args.batch_size, device)
    graphed = variant == "graphed"
    step, optimizer = make_step(model, ema, images, targets, DTYPES[dtype_name], device, graphed=graphed)
    before = compile_counts()
    t0 = time.perf_counter()
    step()  # first touch: lazy initialisation, optimizer state, cuDNN heuristics; compiled: compiling
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    after = compile_counts()
    budget.check()
    with ActivationMeter(exclude=model, cuda_device=device if device.type == "cuda" else "cpu") as meter:
        step()  # graphed: still an eager warm-up step, so the memory numbers are an eager step's
        _sync(device)
    if compile_counts()["graphs"] != after["graphs"]:
        raise RuntimeError(f"{variant}: the second step compiled more graphs")
    if graphed:
        step()  # capture, then the first replay: untimed
        _sync(device)
        if step.local_step.num_graphs != 1:
            raise RuntimeError("graphed variant: the step was not captured")
    act_peak = meter.peak_bytes
    return step, dict(
        act_peak=act_peak,
        cuda_peak=meter.cuda_max_allocated,
        total=state_bytes(model, optimizer) + act_peak,
        n_inference=sum(p.numel() for p in model.inference_parameters()),
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        first_ms=first_ms,
        compiled={k: after[k] - before[k] for k in after},
    )


def compile_counts() -> dict:
    """Graphs dynamo compiled so far in this process, and inductor's cache hits and misses."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"graphs": counters["stats"]["unique_graphs"], "cache_hits": inductor["fxgraph_cache_hit"],
            "cache_misses": inductor["fxgraph_cache_miss"]}


def _release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(arch, K, method, variant, dtype_name, args, device, budget):
    """One configuration: dict of numbers, or raises (the caller reports and goes on)."""
    step, numbers = prepare(arch, K, method, variant, dtype_name, args, device, budget)
    budget.check()
    graphs = compile_counts()["graphs"]
    numbers["times"] = time_steps(
        step,
        device,
        budget,
        warmup=args.warmup,
        reps=args.reps,
        min_reps=args.min_reps,
        max_seconds=args.max_seconds,
    )
    if compile_counts()["graphs"] != graphs:
        raise RuntimeError(f"{variant}: compiled during the timed steps")
    del step
    _release(device)
    return numbers


def measure_alternating(arch, K, method, variants, dtype_name, args, device, budget):
    """CPU: every variant of one method built first, then timed one step each in turn.

    A shared CPU drifts in speed over minutes; alternating gives every variant the same spells,
    so the ratios between them hold even when the absolute times move. Returns {variant: numbers
    or the exception that variant raised}."""
    results, steps = {}, {}
    for variant in variants:
        try:
            steps[variant], results[variant] = prepare(arch, K, method, variant, dtype_name, args, device,
                                                       budget)
        except BudgetSpent:
            raise
        except Exception as exc:  # this variant is reported as failed; the others go on
            results[variant] = exc
    for _ in range(args.warmup):
        for step in steps.values():
            budget.check()
            step()
    graphs = compile_counts()["graphs"]
    times = {variant: [] for variant in steps}
    t_end = time.perf_counter() + args.max_seconds * max(1, len(steps))

    def done() -> int:  # steps timed for every variant
        return min(map(len, times.values()), default=args.reps)

    while steps and done() < args.reps and (done() < args.min_reps or time.perf_counter() < t_end):
        if done() and budget.left() <= 0:
            break
        for variant, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[variant].append((time.perf_counter() - t0) * 1e3)
    if compile_counts()["graphs"] != graphs:
        raise RuntimeError(f"{', '.join(steps)}: compiled during the timed steps")
    for variant in steps:
        results[variant]["times"] = times[variant]
    del steps
    _release(device)
    return results


def plan(args):
    """(arch, K, method, variant, dtype) in measuring order.

    Groups (arch, K, dtype) go by priority: the first two (arch, K) pairs in every dtype, then the
    rest, so a short budget covers the speed and memory claims first. Inside a group e2e (once per
    arch and dtype: it has no K) and the straightforward variant come first, so the ratios to them
    can be written as soon as each number exists. The compiled variant comes last, for the first
    (arch, K) pair only: compiling takes minutes per configuration, and one shows whether it pays.
    """
    configs = [(a, k) for a, k in CONFIGS if a in args.archs and (not args.ks or k in args.ks)]
    groups = [(c, d) for c in configs[:2] for d in args.dtypes] + [
        (c, d) for c in configs[2:] for d in args.dtypes
    ]
    runs, compiled, e2e_done = [], [], set()
    for (arch, K), dtype_name in groups:
        for method in args.methods:
            if method == "e2e":
                if (arch, dtype_name) in e2e_done:
                    continue
                e2e_done.add((arch, dtype_name))
            for variant in args.variants:
                if variant == "scheduled" and "mlaan" not in method:
                    continue  # nothing to schedule without cascade windows
                if variant in ("graphed", "compiled") and "mlaan" not in method and method != "e2e":
                    continue
                run = (arch, 1 if method == "e2e" else K, method, variant, dtype_name)
                if variant != "compiled":
                    runs.append(run)
                elif (arch, K) == configs[0]:
                    compiled.append(run)
    return runs + compiled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="folder for train_step.csv/.png (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions; on CPU only ResNet-32 K=16")
    p.add_argument("--budget", type=float, default=None, help="seconds; stop cleanly when spent")
    p.add_argument("--archs", default=None, help="comma list (default: resnet32,resnet110)")
    p.add_argument("--ks", default=None, help="comma list of K to keep (default: all of the issue's)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16 (GPU default both, CPU fp32)")
    p.add_argument("--batch-size", type=int, default=None, help="default 1024 on GPU, 64 on CPU")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)"
    )
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (1024 if on_gpu else 64)
    args.archs = args.archs.split(",") if args.archs else ["resnet32", "resnet110"]
    args.ks = [int(k) for k in args.ks.split(",")] if args.ks else ([16] if args.quick and not on_gpu else [])
    if args.quick and not on_gpu and "resnet32" in args.archs:
        args.archs = ["resnet32"]
    args.methods = [m for m in args.methods.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["bf16", "fp32"] if on_gpu else ["fp32"])
    for name, chosen, allowed in (
        ("methods", args.methods, METHODS),
        ("variants", args.variants, VARIANTS),
        ("dtypes", args.dtypes, list(DTYPES)),
    ):
        bad = [c for c in chosen if c not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {allowed}")
    args.warmup, args.reps, args.min_reps, args.max_seconds = (
        (0, 5, 3, 4.0) if args.quick else (2, 30, 5, 15.0)
    )

    budget = Budget(args.budget)
    if "graphed" in args.variants and not on_gpu:
        print("note: variant 'graphed' skipped: CUDA graphs need a GPU")
        args.variants = [v for v in args.variants if v != "graphed"]

    writer = CsvWriter("train_step", device, args.out)
    dev = device_name(device)
    print(
        f"train step on {dev}, torch {torch.__version__}, batch {args.batch_size}"
        + (f", budget {args.budget:.0f} s" if args.budget else "")
    )
    print(
        f"{'config':<34} {'method/variant':<30} {'ms p50':>9} {'img/s':>9} {'act MiB':>9} "
        f"{'alloc MiB':>9} {'total MiB':>9} {'vs e2e':>7} {'vs straight':>11}"
    )
    e2e_ms: dict[tuple, float] = {}  # (arch, dtype, variant) -> p50 ms
    straight_ms: dict[tuple, float] = {}  # (arch, K, method, dtype) -> p50 ms
    variant_ms: dict[tuple, float] = {}  # (arch, K, method, dtype, variant) -> p50 ms
    measured = skipped = 0
    runs = plan(args)
    alternating: dict[tuple, dict] = {}  # CPU: (arch, K, method, dtype) -> {variant: numbers or exception}
    for i, (arch, K, method, variant, dtype_name) in enumerate(runs):
        if budget.left() <= 1.0:
            skipped = len(runs) - i
            print(f"budget spent: {skipped} configuration(s) not measured")
            break
        shape = f"{arch} K={K} B={args.batch_size} {dtype_name}"
        provider = f"{method}/{variant}"
        try:
            if on_gpu:
                r = measure(arch, K, method, variant, dtype_name, args, device, budget)
            else:
                key = (arch, K, method, dtype_name)
                if key not in alternating:
                    group = [v for (a, k, m, v, d) in runs if (a, k, m, d) == key]
                    alternating[key] = measure_alternating(arch, K, method, group, dtype_name, args, device,
                                                           budget)
                r = alternating[key][variant]
                if isinstance(r, Exception):
                    raise r
        except BudgetSpent:
            skipped = len(runs) - i
            print(f"budget spent during {shape} {provider}: "
                  f"it and {skipped - 1} more configuration(s) not measured")
            break
        except Exception as exc:  # report and go on: one broken configuration must not hide the rest
            first_line = (str(exc) or "-").splitlines()[0][:200]
            print(f"{shape:<34} {provider:<30} FAILED: {type(exc).__name__}: {first_line}")
            if os.environ.get("MLAAN_BENCH_TRACEBACK"):
                traceback.print_exc()
            r = None
        if r is None:
            gc.collect()  # the failed configuration's tensors, once the traceback is gone
            if on_gpu:
                torch.cuda.empty_cache()
            continue
        measured += 1
        p50, p20, p80 = quantiles(r["times"])
        note = (f"{len(r['times'])} steps; params inference {r['n_inference'] / 1e6:.3f} M, "
                f"trainable {r['n_trainable'] / 1e6:.3f} M")
        ips = args.batch_size / (p50 / 1e3)
        writer.add("train_step", provider, shape, "step_time", "ms", p50, p20, p80, note)
        writer.add(
            "train_step",
            provider,
            shape,
            "images_per_s",
            "img/s",
            ips,
            args.batch_size / (p80 / 1e3),
            args.batch_size / (p20 / 1e3),
            note,
        )
        writer.add(
            "train_step",
            provider,
            shape,
            "act_peak",
            "MiB",
            r["act_peak"] / MIB,
            note="ActivationMeter: bytes saved for backward, parameters and buffers excluded",
        )
        if r["cuda_peak"] is not None:
            writer.add(
                "train_step",
                provider,
                shape,
                "cuda_max_allocated",
                "MiB",
                r["cuda_peak"] / MIB,
                note="torch.cuda.max_memory_allocated over one step (everything the allocator held)",
            )
        writer.add(
            "train_step",
            provider,
            shape,
            "total_memory",
            "MiB",
            r["total"] / MIB,
            note="parameters + gradients + optimizer state + buffers + act_peak",
        )
        writer.add(
            "train_step",
            provider,
            shape,
            "params",
            "M",
            r["n_trainable"] / 1e6,
            note=f"trainable; inference {r['n_inference'] / 1e6:.3f} M",
        )
        variant_ms[(arch, K, method, dtype_name, variant)] = p50
        if variant in EAGER_TWIN:
            compiled = r["compiled"]
            writer.add(
                "train_step",
                provider,
                shape,
                "compile_time",
                "s",
                max(0.0, r["first_ms"] - p50) / 1e3,
                note=(f"first step's wall time less the median step; {compiled['graphs']} graphs, inductor "
                      f"cache {compiled['cache_hits']} hits / {compiled['cache_misses']} misses"),
            )
            twin = next((t for t in EAGER_TWIN[variant] if (arch, K, method, dtype_name, t) in variant_ms),
                        None)
            if twin is not None:
                writer.add(
                    "train_step",
                    provider,
                    shape,
                    "speedup_vs_eager",
                    "x",
                    variant_ms[(arch, K, method, dtype_name, twin)] / p50,
                    note=f"images/s / images/s of the eager variant '{twin}' (same run)",
                )
        if method == "e2e":
            e2e_ms[(arch, dtype_name, variant)] = p50
        if variant == "straightforward":
            straight_ms[(arch, K, method, dtype_name)] = p50
        ref = e2e_ms.get((arch, dtype_name, variant)) or e2e_ms.get((arch, dtype_name, "fused"))
        vs_e2e = p50 / ref if ref else None
        if vs_e2e is not None:
            writer.add(
                "train_step",
                provider,
                shape,
                "step_time_vs_e2e",
                "x",
                vs_e2e,
                note="step time / e2e step time (same device, run, dtype, batch)",
            )
        base = straight_ms.get((arch, K, method, dtype_name))
        speedup = base / p50 if base and variant != "straightforward" else None
        if speedup is not None:
            writer.add(
                "train_step",
                provider,
                shape,
                "speedup_vs_straightforward",
                "x",
                speedup,
                note="images/s / images/s of the straightforward variant (same run)",
            )
        alloc = f"{r['cuda_peak'] / MIB:9.1f}" if r["cuda_peak"] is not None else f"{'-':>9}"
        print(
            f"{shape:<34} {provider:<30} {p50:9.1f} {ips:9.0f} {r['act_peak'] / MIB:9.1f} {alloc} "
            f"{r['total'] / MIB:9.1f} {vs_e2e or float('nan'):7.2f} {speedup or float('nan'):11.2f}",
            flush=True,
        )
        if variant in EAGER_TWIN:
            print(f"{'':<34} {'':<30} compiling took {max(0.0, r['first_ms'] - p50) / 1e3:.1f} s", flush=True)
    print(f"{measured} configuration(s) measured -> {writer.path}")
    if not args.no_plot and measured:
        try:
            from benchmarks.plot_train_step import plot

            png = plot(writer.path, os.path.join(os.path.dirname(writer.path), "train_step.png"))
            print(f"plot -> {png}")
        except Exception as exc:
            print(f"plot failed: {type(exc).__name__}: {exc}")
    return 0


# --- pytest-benchmark (benchmarks/conftest.py): the steps above, one test per configuration -------

# Quick sizes: the default preset's (arch, K) at a batch whose CPU step takes a fraction of a second,
# and the configurations behind the README's main claims; --bench-full: every method and variant.
QUICK_BATCH = {"cpu": 4, "cuda": 256}
QUICK_RUNS = {("e2e", "fused"), ("mlaan", "straightforward"), ("mlaan", "scheduled"), ("mlaan", "graphed"),
              ("dgl+mlaan", "scheduled")}


def pytest_generate_tests(metafunc):
    if "train_case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    full = metafunc.config.getoption("--bench-full")
    batch = (1024 if device == "cuda" else 64) if full else QUICK_BATCH[device]
    configs = CONFIGS[:2] if full else CONFIGS[:1]
    variants = ["straightforward", "fused", "scheduled"] + (["graphed"] if device == "cuda" else [])
    cases = []
    for arch, K in configs:
        for method in METHODS:
            if method == "e2e" and any(c[0] == arch and c[2] == "e2e" for c in cases):
                continue  # e2e has no K: once per arch
            for variant in variants:
                if variant == "scheduled" and "mlaan" not in method:
                    continue  # nothing to schedule without cascade windows
                if variant == "graphed" and "mlaan" not in method and method != "e2e":
                    continue
                if not full and (method, variant) not in QUICK_RUNS:
                    continue
                cases.append((arch, 1 if method == "e2e" else K, method, variant, batch))
    metafunc.parametrize("train_case", cases, ids=[f"{a}-K{k}-{m}-{v}-B{b}" for a, k, m, v, b in cases])


def test_train_step(train_case, timed, bench_device, bench_full):
    """One training step (local forwards/backwards, SGD, EMA) of one configuration, fp32."""
    arch, K, method, variant, batch = train_case
    torch.manual_seed(0)
    model, ema = build(arch, K, method, variant, bench_device)
    images, targets = _batch(batch, bench_device)
    step, _ = make_step(model, ema, images, targets, None, bench_device, graphed=variant == "graphed")
    step()  # lazy initialisation, optimizer state
    step()  # graphed: the capture
    timed(step, rounds=None if bench_full else 3)


if __name__ == "__main__":
    sys.exit(main())
