"""PNG plots of one or several runs (loss, accuracy, images/s per epoch), overlaid for comparison."""
from __future__ import annotations

from pathlib import Path

from mlaan_fast.train.metrics import read_metrics

_FIGURES = {
    "loss.png": ("loss", [("train_loss", "-", "train"), ("test_loss", "--", "test")]),
    "accuracy.png": ("accuracy (%)", [("train_acc", "-", "train"), ("test_acc", "--", "test")]),
    "throughput.png": ("training images/s", [("images_per_s", "-", "")]),
}


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Write loss.png, accuracy.png and throughput.png overlaying ``run_dirs``; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(Path(d).name or str(d), read_metrics(d)) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (ylabel, series) in _FIGURES.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
        for (name, rows), color in zip(runs, _colors(len(runs))):
            for key, style, label in series:
                pts = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, color=color, marker="o", markersize=3,
                            label=f"{name} {label}".strip())
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def _colors(n: int):
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]
