"""Plot train_step.csv: saved-activation peak vs K per method, and images/s per method and variant.

Usage: python benchmarks/plot_train_step.py [CSV] [PNG]   (default benchmarks/results/train_step.csv)
One device per figure (the device of the newest row unless ``--device`` names another).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = re.compile(r"(?P<arch>\S+) K=(?P<K>\d+) B=(?P<B>\d+) (?P<dtype>\S+)")
METHOD_ORDER = ["e2e", "dgl", "infopro", "mlaan", "dgl+mlaan", "infopro+mlaan"]
VARIANT_ORDER = ["straightforward", "fused", "scheduled"]


def latest_rows(path: str, device: str | None = None) -> tuple[str, list[dict]]:
    """The newest row per (provider, shape, metric) of one device, and that device's name."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("op") == "train_step"]
    if not rows:
        raise ValueError(f"{path}: no train_step rows")
    device = device or rows[-1]["device"]
    newest: dict[tuple, dict] = {}
    for r in rows:
        if r["device"] == device:
            newest[(r["provider"], r["shape"], r["metric"])] = r
    return device, list(newest.values())


def _parse(row):
    m = SHAPE.fullmatch(row["shape"])
    method, _, variant = row["provider"].partition("/")
    return dict(
        arch=m["arch"],
        K=int(m["K"]),
        B=int(m["B"]),
        dtype=m["dtype"],
        method=method,
        variant=variant,
        value=float(row["p50"]),
    )


def plot(csv_path: str, png_path: str, device: str | None = None) -> str:
    """Write the figure for ``csv_path`` to ``png_path`` and return ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, rows = latest_rows(csv_path, device)
    data = [dict(_parse(r), metric=r["metric"]) for r in rows]
    meta = rows[-1]
    archs = sorted({d["arch"] for d in data}, key=lambda a: int(re.sub(r"\D", "", a) or 0))
    dtypes = sorted({d["dtype"] for d in data})
    # images/s panels: one per (arch, K, dtype) with K > 1, in the order they were measured.
    groups = []
    for d in data:
        key = (d["arch"], d["K"], d["dtype"], d["B"])
        if d["metric"] == "images_per_s" and d["K"] > 1 and key not in groups:
            groups.append(key)
    n_panels = len(archs) + len(groups)
    cols = min(3, n_panels)
    rows_n = -(-n_panels // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    axes = list(axes.flat)
    for ax, arch in zip(axes, archs):
        for dtype in dtypes:
            for method in METHOD_ORDER:
                for variant in VARIANT_ORDER:
                    pts = sorted(
                        (d["K"], d["value"])
                        for d in data
                        if d["metric"] == "act_peak"
                        and d["arch"] == arch
                        and d["dtype"] == dtype
                        and d["method"] == method
                        and d["variant"] == variant
                    )
                    if pts and method == "e2e":  # e2e has no K: one reference level per dtype
                        ax.axhline(
                            pts[0][1], color="black", linestyle="--", linewidth=1, label=f"e2e {dtype}"
                        )
                        break
                    if pts:
                        ks, vals = zip(*pts)
                        ax.plot(ks, vals, marker="o", label=f"{method}/{variant} {dtype}")
        ax.set_title(f"{arch}: saved-activation peak")
        ax.set_xlabel("K")
        ax.set_ylabel("MiB")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax, (arch, K, dtype, B) in zip(axes[len(archs) :], groups):
        methods = [m for m in METHOD_ORDER if any(d["method"] == m for d in data)]
        width = 0.8 / len(VARIANT_ORDER)
        for j, variant in enumerate(VARIANT_ORDER):
            xs, ys = [], []
            for i, method in enumerate(methods):
                k = 1 if method == "e2e" else K
                vals = [
                    d["value"]
                    for d in data
                    if d["metric"] == "images_per_s"
                    and d["arch"] == arch
                    and d["K"] == k
                    and d["dtype"] == dtype
                    and d["B"] == B
                    and d["method"] == method
                    and d["variant"] == variant
                ]
                if vals:
                    xs.append(i + (j - 1) * width)
                    ys.append(vals[0])
            if xs:
                ax.bar(xs, ys, width=width, label=variant)
        ax.set_xticks(range(len(methods)), methods, rotation=30, fontsize=7)
        ax.set_title(f"{arch} K={K} B={B} {dtype}: images/s")
        ax.set_ylabel("images/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n_panels:]:
        ax.axis("off")
    fig.suptitle(
        f"Training step on {device} (torch {meta['torch']}, {meta['date']}, commit {meta['commit']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("csv", nargs="?", default=os.path.join(HERE, "results", "train_step.csv"))
    p.add_argument("png", nargs="?", default=None)
    p.add_argument("--device", default=None, help="device name as in the CSV (default: newest row's)")
    args = p.parse_args(argv)
    png = args.png or os.path.splitext(args.csv)[0] + ".png"
    print(plot(args.csv, png, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
