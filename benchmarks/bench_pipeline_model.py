"""A cost model of the module pipeline: predicted speed-up over one device for P stages.

Stage compute comes from measured per-module times (``measure_module_costs``: module m's forward
plus window m, on the device at hand) cut into the partition the trainer would choose; traffic is
the activations (and returning gradient streams) at each cut, in bytes from the model's real shapes,
over a link bandwidth. Per step, with n micro-batches:

  one device:  T1 = sum of module times
  sync:        T  = (n + P - 1) / n * max_p(stage_p + link_p),   link_p = bytes crossing cut p / bandwidth
  async:       T  = max_p(stage_p + link_p)                       (no flush: the bubble is gone)

which ignores kernel-launch overlap with communication (NCCL sends run on their own stream, so
the estimate is pessimistic where links are fast) and the smaller efficiency of small micro-batches.

  python benchmarks/bench_pipeline_model.py --bandwidth-gbs 450 --batch 1024   # H100 SXM NVLink 4, one way

Rows (predicted_speedup per P and mode, link time per step) go to benchmarks/results/pipeline_model.csv;
the device named is the one the module times were measured on.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import CsvWriter  # noqa: E402
from mlaan_fast.models import build_model  # noqa: E402
from mlaan_fast.runtime.pipeline import balanced_partition, layouts, measure_module_costs  # noqa: E402


def cut_bytes(model, partition, images: torch.Tensor) -> list[int]:
    """Bytes that cross each cut per step: the activation forward and one gradient stream per window that
    crosses it back (the batch's real shapes, the model's dtype)."""
    sizes, h = [], images
    with torch.no_grad():
        for module in model.local_modules:
            h = module(h)
            sizes.append(h.numel() * h.element_size())
    out = []
    for layout in layouts(model, partition)[1:]:
        activation = sizes[layout.first - 1]
        out.append(activation * (1 + len(layout.streams_out)))
    return out


def predict(costs: list[float], cuts: list[int], partition, bandwidth_gbs: float, n: int | None) -> float:
    """Predicted speed-up of the pipeline over one device (n None: async)."""
    links = [0.0] + [b / (bandwidth_gbs * 1e9) for b in cuts]  # a stage pays for the cut in front of it
    stages = [c + link for c, link in zip(partition.stage_costs(), links)]
    factor = 1.0 if n is None else (n + partition.num_stages - 1) / n
    return sum(costs) / (factor * max(stages))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["resnet32:16", "resnet110:55"], help="ARCH:K")
    parser.add_argument("--method", default="mlaan")
    parser.add_argument("--batch", type=int, default=1024, help="the batch the link carries")
    parser.add_argument("--profile-batch", type=int, default=None,
                        help="the batch the module times are measured at (default: --batch on a GPU, where a "
                             "small batch is launch-bound and would not scale; 64 on a CPU)")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--bandwidth-gbs", type=float, default=450.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="CSV folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="ResNet-32 K=16 only")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs = args.configs[:1]
    device = torch.device(args.device)
    if args.profile_batch is None:
        args.profile_batch = args.batch if device.type == "cuda" else 64
    csv = CsvWriter("pipeline_model", device, args.out)
    for config in args.configs:
        arch, K = config.split(":")
        torch.manual_seed(0)
        model = build_model(arch, K=int(K), method=args.method).to(device)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(args.profile_batch, 3, 32, 32, generator=g).to(device)
        targets = torch.randint(0, 10, (args.profile_batch,), generator=g).to(device)
        costs = measure_module_costs(model, images, targets)
        # Module times scale with the batch; the link bytes are computed at --batch directly.
        costs = [c * args.batch / args.profile_batch for c in costs]
        shape = f"{arch} K={K} {args.method} B={args.batch} link={args.bandwidth_gbs:g}GB/s"
        for P in args.stages:
            if P > model.num_modules:
                continue
            partition = balanced_partition(costs, P)
            cuts = cut_bytes(model, partition, torch.zeros(args.batch, 3, 32, 32, device=device))
            link_ms = 1e3 * max(cuts) / (args.bandwidth_gbs * 1e9)
            csv.add("pipeline_model", f"P={P} async", shape, "predicted_speedup", "x",
                    predict(costs, cuts, partition, args.bandwidth_gbs, None))
            for n in args.microbatches:
                csv.add("pipeline_model", f"P={P} sync n={n}", shape, "predicted_speedup", "x",
                        predict(costs, cuts, partition, args.bandwidth_gbs, n))
            csv.add("pipeline_model", f"P={P} async", shape, "busiest_link_per_step", "ms", link_ms)
            csv.add("pipeline_model", f"P={P} async", shape, "one_device_step", "ms", 1e3 * sum(costs))
            print(f"{shape} P={P}: balance {partition.predicted_speedup():.2f}x, busiest link "
                  f"{link_ms:.3f} ms per step against {1e3 * sum(costs):.0f} ms of compute", flush=True)
    print(f"wrote {len(csv.rows)} rows to {csv.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
