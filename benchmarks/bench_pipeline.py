"""Module pipeline throughput and memory: one model's stages on P processes against one process.

Each configuration trains the same model on the same in-memory batches (a step is the local
forwards/backwards, the optimizer step and the EMA update). Baselines, measured in the same run
and in alternation with the pipelines: one process with one thread, and one process with as many
threads as all stages together. Per stage: time waiting for other stages (the bubble's share),
bytes sent per step, saved-activation peak, and parameters + optimizer state + buffers, with what
a stage holds twice (EMA shadows and boundary copies of other stages' blocks).

  python benchmarks/bench_pipeline.py                     # ResNet-32 K=16 mlaan, batch 128, CPU
  python benchmarks/bench_pipeline.py --quick             # fewer steps and rounds
  python benchmarks/bench_pipeline.py --stages 2 4 --device cuda   # GPUs (one per stage)

Rows go to benchmarks/results/pipeline.csv (device named in every row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import CsvWriter  # noqa: E402
from mlaan_fast.models import build_model  # noqa: E402
from mlaan_fast.profiling import ActivationMeter  # noqa: E402
from mlaan_fast.runtime import LocalStep  # noqa: E402
from mlaan_fast.runtime.pipeline import (  # noqa: E402
    Pipeline,
    balanced_partition,
    make_groups,
    measure_module_costs,
)
from mlaan_fast.runtime.runner import ModelRunner  # noqa: E402

MIB = 2.0**20


def _model(args):
    torch.manual_seed(0)
    return build_model(args.arch, K=args.K, method=args.method)


def _batches(args, device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(2)]


def _state_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def _timed_steps(step, optimizer, update, batches, warmup, steps, device):
    """Wall-clock seconds of each of ``steps`` steps after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + steps):
        images, targets = batches[i % len(batches)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step(images, targets)
        optimizer.step()
        update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def single_process(args, threads: int, device) -> dict:
    """Seconds per step of one process (``threads`` threads), its saved-activation peak and state bytes."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = _model(args).to(device)
        step = LocalStep(model, check_targets=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batches = _batches(args, device)
        times = _timed_steps(step, optimizer, model.update_shadows, batches, args.warmup, args.steps, device)
        with ActivationMeter(exclude=model) as meter:
            step(*batches[0])
        params = [p for p in model.parameters()]
        return {"times": times, "peak": meter.peak_bytes, "params": _state_bytes(params),
                "optimizer": _state_bytes(params), "buffers": _state_bytes(model.buffers())}
    finally:
        torch.set_num_threads(old)


def _stage_worker(rank, world, port, args, mode, n, partition, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    model = _model(args)
    pipe = Pipeline(model, partition, stage=rank, replica=0, device=device,
                    groups=make_groups(world, 1, rank), mode=mode, microbatches=n, timeout_s=600)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.01, momentum=0.9)
    batches = _batches(args, device)
    warm = _timed_steps(pipe.step, optimizer, pipe.update_shadows, batches, 0, args.warmup, device)
    waited, sent = pipe.waited_s(), pipe.bytes_sent()
    times = _timed_steps(pipe.step, optimizer, pipe.update_shadows, batches, 0, args.steps, device)
    waited, sent = pipe.waited_s() - waited, pipe.bytes_sent() - sent
    with ActivationMeter(exclude=model) as meter:
        optimizer.zero_grad(set_to_none=True)
        pipe.step(*batches[0])
        optimizer.step()
        pipe.update_shadows()
    pipe.drain()
    stage = pipe.stage
    shadows = [getattr(model, name).flat for name in ("shadow_bank", "frozen_shadow_bank")
               if getattr(model, name) is not None]
    boundary = [p for block in stage.boundary.values() for p in block.parameters()]
    params = pipe.parameters()
    torch.save({"times": times, "warm": warm, "waited": waited / args.steps, "sent": sent / args.steps,
                "peak": meter.peak_bytes, "params": _state_bytes(params), "optimizer": _state_bytes(params),
                "buffers": _state_bytes(model.buffers()),
                "shadows": _state_bytes(shadows), "boundary": _state_bytes(boundary),
                "modules": (pipe.layout.first, pipe.layout.last)}, f"{out}.{rank}")
    dist.destroy_process_group()


def _dp_worker(rank, world, port, args, overlap, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    model = _model(args).to(device)
    runner = ModelRunner(model, LocalStep(model, check_targets=False), overlap_allreduce=overlap)
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.01, momentum=0.9)

    def step(images, targets):
        runner.step(images, targets)
        runner.reduce_gradients()

    batches = _batches(args, device)
    _timed_steps(step, optimizer, runner.update_shadows, batches, 0, args.warmup, device)
    runner.reducer.waited_s = 0.0
    times = _timed_steps(step, optimizer, runner.update_shadows, batches, 0, args.steps, device)
    torch.save({"times": times, "waited": runner.reducer.waited_s / args.steps}, f"{out}.{rank}")
    dist.destroy_process_group()


def _spawn(worker, world: int, *args) -> list[dict]:
    """Run ``worker(rank, world, port, *args, out)`` in ``world`` processes; -> each rank's saved dict."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank")
        mp.start_processes(worker, args=(world, port, *args, out), nprocs=world, start_method="spawn")
        return [torch.load(f"{out}.{r}") for r in range(world)]


def pipeline(args, stages: int, mode: str, n: int, partition) -> list[dict]:
    """Per-stage results of one pipeline run (P processes, one thread each)."""
    return _spawn(_stage_worker, stages, args, mode, n, partition)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet32")
    parser.add_argument("--K", type=int, default=16)
    parser.add_argument("--method", default="mlaan")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 rounds")
    parser.add_argument("--data-parallel", action=argparse.BooleanOptionalAction, default=True,
                        help="also time 2 data-parallel processes with and without the overlapped all-reduce")
    parser.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                        help="CSV folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 3, 2
    device = torch.device(args.device)
    csv = CsvWriter("pipeline", device if device.type == "cuda" else "cpu", args.out_dir)
    csv.common["device"] = (f"{torch.cuda.get_device_name()} x{max(args.stages)}" if device.type == "cuda"
                            else f"CPU ({os.uname().machine}, 1 thread per process)")
    shape = f"{args.arch} K={args.K} {args.method} B={args.batch}"

    # The partition from one profiled step (as the trainer makes it), then every configuration in rounds.
    model = _model(args).to(device)
    batch = _batches(args, device)[0]
    costs = measure_module_costs(model, *batch)
    configs = [("single", 1, "1 thread", None, None)]
    configs += [("single", 1, f"{max(args.stages)} threads", None, None)] if device.type == "cpu" else []
    for P in args.stages:
        part = balanced_partition(costs, P)
        print(part.describe(), flush=True)
        configs += [("pipeline", P, f"sync n={n}", "sync", (n, part)) for n in args.microbatches]
        configs += [("pipeline", P, "async", "async", (1, part))]
    if args.data_parallel:
        # Plain data parallelism on 2 processes, each the whole model on half the batch's work
        # (the same per-rank batch): all-reduce overlapped with the step, or all at its end.
        configs += [("data-parallel", 2, "overlapped all-reduce", True, None),
                    ("data-parallel", 2, "all-reduce at the end", False, None)]
    results: dict[tuple, list] = {}
    for r in range(args.rounds):
        for kind, P, label, mode, extra in configs:
            if kind == "single":
                threads = 1 if label == "1 thread" else max(args.stages)
                res = [single_process(args, threads, device)]
            elif kind == "data-parallel":
                res = _spawn(_dp_worker, P, args, mode)
            else:
                res = pipeline(args, P, mode, *extra)
            results.setdefault((kind, P, label), []).append(res)
            step_s = statistics.median(res[0]["times"])
            images = args.batch * (P if kind == "data-parallel" else 1)  # each DP rank has its own batch
            print(f"round {r + 1}: {kind} P={P} {label}: {images / step_s:.1f} images/s", flush=True)

    base = [statistics.median(run[0]["times"]) for run in results[("single", 1, "1 thread")]]
    for (kind, P, label), runs in results.items():
        provider = {"pipeline": f"pipeline P={P} {label}", "single": f"1 process, {label}",
                    "data-parallel": f"data parallel D={P}, {label}"}[kind]
        # Data-parallel ranks each step on a batch of their own: the run trains P batches per step.
        batches = P if kind == "data-parallel" else 1
        per_round = [statistics.median(run[0]["times"]) / batches for run in runs]
        ips = sorted(args.batch / t for t in per_round)
        csv.add("pipeline", provider, shape, "throughput", "images/s", statistics.median(ips), ips[0],
                ips[-1])
        ratios = sorted(b / t for b, t in zip(base, per_round))
        csv.add("pipeline", provider, shape, "speedup_vs_1_process_1_thread", "x", statistics.median(ratios),
                ratios[0], ratios[-1])
        last = runs[-1]
        if kind == "data-parallel":
            waited = sorted(run[0]["waited"] / statistics.median(run[0]["times"]) for run in runs)
            csv.add("pipeline", provider, shape, "waiting_for_all_reduce", "%",
                    100 * statistics.median(waited), 100 * waited[0], 100 * waited[-1])
            continue
        for p, stage in enumerate(last):
            where = f"{provider} stage {p}" if kind == "pipeline" else provider
            step_s = statistics.median(stage["times"])
            if kind == "pipeline":
                csv.add("pipeline", where, shape, "waiting_fraction", "%", 100 * stage["waited"] / step_s,
                        note=f"modules {stage['modules'][0]}..{stage['modules'][1]}")
                csv.add("pipeline", where, shape, "bytes_sent_per_step", "MiB", stage["sent"] / MIB)
                csv.add("pipeline", where, shape, "duplicated_shadows_and_boundary", "MiB",
                        (stage["shadows"] + stage["boundary"]) / MIB)
            csv.add("pipeline", where, shape, "saved_activation_peak", "MiB", stage["peak"] / MIB)
            csv.add("pipeline", where, shape, "params_optimizer_buffers", "MiB",
                    (stage["params"] + stage["optimizer"] + stage["buffers"]) / MIB)
    print(f"wrote {len(csv.rows)} rows to {csv.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
