"""Benchmark of the multi-tensor EMA update (shadow <- m*shadow + (1-m)*live, fp32, 12 bytes per element).

Parameter sets: the distinct EMA shadows of MLAAN (the first block of every LAM list, one shadow
per distinct live block) of CIFAR ResNet-32 K=16 and ResNet-110 K=55, all parameters of ImageNet
ResNet-101, and flat buffers of 1M/16M/64M elements.

    python benchmarks/bench_ema.py [--quick] [--device cpu|cuda] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import CsvWriter, bench, copy_bandwidth_gbs, device_name  # noqa: E402
from mlaan_fast.ops import available_backends, ema_update_, use_backend  # noqa: E402

DECAY = 0.995
CIFAR_WIDTHS = {1: 16, 2: 32, 3: 64}
# First block of every LAM list of the method's presets: the blocks that carry an EMA shadow.
SHADOWED_BLOCKS = {
    "resnet32_k16": [(2, 0), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)],
    "resnet110_k55": [(2, 0), (3, 0), (3, 8), (3, 14), (3, 15), (3, 16), (3, 17)],
}


def cifar_block_shapes(stage: int, block: int) -> list[tuple[int, ...]]:
    """Parameter shapes of CIFAR BasicBlock [stage, block]: two conv3x3+BN, 1x1 conv+BN shortcut at a
    stage start."""
    out = CIFAR_WIDTHS[stage]
    inp = CIFAR_WIDTHS[stage - 1] if block == 0 and stage > 1 else out
    shapes = [(out, inp, 3, 3), (out,), (out,), (out, out, 3, 3), (out,), (out,)]
    if inp != out:
        shapes += [(out, inp, 1, 1), (out,), (out,)]
    return shapes


def resnet101_shapes() -> list[tuple[int, ...]]:
    """Shapes of every parameter of torchvision's ImageNet ResNet-101."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet101()
    return [tuple(p.shape) for p in model.parameters()]


def parameter_sets(quick: bool, device: torch.device) -> dict[str, list[tuple[int, ...]]]:
    """The sets to time, most telling first. --quick on CPU drops ResNet-101 and 64M (GPU keeps them)."""
    sets = {name: [s for blk in blocks for s in cifar_block_shapes(*blk)]
            for name, blocks in SHADOWED_BLOCKS.items()}
    small = quick and device.type == "cpu"
    for n in [1 << 24] if small else [1 << 24, 1 << 26]:
        sets[f"flat_{n >> 20}M"] = [(n,)]
    if not small:
        sets["resnet101_all"] = resnet101_shapes()
    sets["flat_1M"] = [(1 << 20,)]
    return sets


def baselines(shadow, live, compile: bool = True):
    """The PyTorch ways to do the update, each a zero-argument callable (``compile``: with the
    torch.compile'd foreach, compiled here)."""
    w = 1.0 - DECAY
    own = [s.clone() for s in shadow]  # per_param rebinds .data: keep it off the shared tensors

    def per_param():  # the reference method's own update, parameter by parameter
        for s, t in zip(own, live):
            s.data = s.data * DECAY + t.data * (1 - DECAY)

    def lerp_loop():
        for s, t in zip(shadow, live):
            s.lerp_(t, w)

    def foreach_lerp():
        torch._foreach_lerp_(shadow, live, w)

    out = {"per_param": per_param, "lerp_loop": lerp_loop, "foreach_lerp": foreach_lerp}
    if compile:
        compiled = torch.compile(lambda s, t: torch._foreach_lerp_(s, t, w))
        compiled(shadow, live)  # compile outside the timed region
        out["compile_foreach"] = lambda: compiled(shadow, live)
    return out


def ours(shadow, live, flat_s, flat_l, device):
    """Our backends that run on ``device``, list and flat forms."""
    avail = available_backends()
    names = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    out = {}
    for name in names:
        if not avail[name][0]:
            print(f"  skip {name}: {avail[name][1]}")
            continue

        def run_list(name=name):
            with use_backend(name):
                ema_update_(shadow, live, DECAY)

        def run_flat(name=name):
            with use_backend(name):
                ema_update_([flat_s], [flat_l], DECAY)

        if len(shadow) > 1:
            out[f"{name}_list"] = run_list
        out[f"{name}_flat"] = run_flat
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller sizes, short repetitions")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="CSV folder (default benchmarks/results)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no new parameter set after this long "
                             "(the rest are listed as skipped)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rep_ms = 100 if args.quick else 400
    # On a CPU shared with other processes single medians wander: interleave the providers over
    # several rounds and keep each provider's best round.
    rounds = 5 if device.type == "cpu" else 1
    writer = CsvWriter("ema", device, args.out)
    print(f"EMA update on {device_name(device)}  torch {torch.__version__}")

    numel = (1 << 24) if args.quick and device.type == "cpu" else (1 << 26)
    copy_bw = copy_bandwidth_gbs(device, numel=numel)
    writer.add("ema_update_", "copy", "fp32 copy", "bandwidth", "GB/s", copy_bw,
               note="device copy, read+write")
    print(f"measured copy bandwidth: {copy_bw:.1f} GB/s\n")

    table = []
    t0 = time.perf_counter()
    for set_name, shapes in parameter_sets(args.quick, device).items():
        if args.budget is not None and time.perf_counter() - t0 > args.budget:
            print(f"  budget of {args.budget:.0f}s spent: skipped {set_name}")
            continue
        numel = sum(torch.Size(s).numel() for s in shapes)
        shape = f"{set_name} ({len(shapes)} tensors, {numel} elements)"
        shadow = [torch.randn(s, device=device) for s in shapes]
        live = [torch.randn(s, device=device) for s in shapes]
        flat_s = torch.cat([t.reshape(-1) for t in shadow])
        flat_l = torch.cat([t.reshape(-1) for t in live])
        providers = {**baselines(shadow, live), **ours(shadow, live, flat_s, flat_l, device)}
        best = {}
        for _ in range(rounds):
            for prov, fn in providers.items():
                q = bench(fn, device, rep_ms=rep_ms)
                if prov not in best or q[0] < best[prov][0]:
                    best[prov] = q
        times = {}
        note = f"best of {rounds} interleaved rounds" if rounds > 1 else ""
        for prov, q in best.items():
            us = [1e3 * x for x in q]
            gbs = 12 * numel / (q[0] * 1e-3) / 1e9
            times[prov] = us[0]
            writer.add("ema_update_", prov, shape, "time", "us", *us, note=note)
            writer.add("ema_update_", prov, shape, "bandwidth", "GB/s", gbs,
                       note=f"12 B/element; {gbs / copy_bw:.0%} of copy bandwidth")
        for prov, t in times.items():
            for base, tb in times.items():
                if base != prov:
                    writer.add("ema_update_", prov, shape, f"speedup_vs_{base}", "x", tb / t)
        table.append((shape, numel, times))
        del shadow, live, flat_s, flat_l
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"{'set':<48} {'provider':<16} {'us':>10} {'GB/s':>8} {'vs foreach':>10} {'vs per_param':>12}")
    for shape, numel, times in table:
        for prov, t in times.items():
            print(f"{shape:<48} {prov:<16} {t:>10.1f} {12 * numel / (t * 1e-6) / 1e9:>8.1f} "
                  f"{times['foreach_lerp'] / t:>9.2f}x {times['per_param'] / t:>11.2f}x")
    print(f"\nrows appended to {writer.path}")
    return 0


# --- pytest-benchmark (benchmarks/conftest.py): the providers above, one test per set and provider --

def pytest_generate_tests(metafunc):
    if "ema_case" not in metafunc.fixturenames:
        return
    device = metafunc.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    full = metafunc.config.getoption("--bench-full")
    sets = list(parameter_sets(not full, torch.device(device)))
    if not full:
        sets = sets[:1]  # resnet32_k16: the shadows of the default preset
    providers = ["per_param", "lerp_loop", "foreach_lerp"] + (["compile_foreach"] if full else [])
    for name in ["cuda", "triton"] if device == "cuda" else ["cpu"]:
        providers += [f"{name}_list", f"{name}_flat"]
    cases = [(s, p) for s in sets for p in providers]
    metafunc.parametrize("ema_case", cases, ids=[f"{s}-{p}" for s, p in cases])


def test_ema_update(ema_case, timed, bench_device, bench_full):
    """One EMA update of a whole parameter set (fp32)."""
    import pytest

    set_name, provider = ema_case
    backend = provider.rsplit("_", 1)[0]
    if backend in ("cpu", "cuda", "triton") and not available_backends()[backend][0]:
        pytest.skip(f"{backend}: {available_backends()[backend][1]}")
    shapes = parameter_sets(not bench_full, bench_device)[set_name]
    shadow = [torch.randn(s, device=bench_device) for s in shapes]
    live = [torch.randn(s, device=bench_device) for s in shapes]
    flat_s = torch.cat([t.reshape(-1) for t in shadow])
    flat_l = torch.cat([t.reshape(-1) for t in live])
    providers = {**baselines(shadow, live, compile=provider == "compile_foreach"),
                 **ours(shadow, live, flat_s, flat_l, bench_device)}
    fn = providers[provider]
    fn()  # warm-up
    timed(fn)


if __name__ == "__main__":
    sys.exit(main())
