"""Per-epoch metrics on disk: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv``, and
``summary.json`` at the end of a run."""
from __future__ import annotations

import csv
import json
from pathlib import Path


class MetricsLog:
    """Appends one row per epoch to ``run_dir/metrics.jsonl`` and rewrites ``metrics.csv`` from it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        self.rows = read_metrics(self.run_dir) if self.jsonl.exists() else []

    def keep_epochs_before(self, epoch: int) -> None:
        """Forget rows of epochs >= ``epoch`` (a resumed run rewrites them)."""
        self.rows = [r for r in self.rows if r["epoch"] < epoch]
        self._rewrite()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv()

    def _rewrite(self) -> None:
        with open(self.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._write_csv()

    def _write_csv(self) -> None:
        flat = [_flatten(r) for r in self.rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)


def _flatten(row: dict) -> dict:
    """Lists become numbered columns (``module_loss_0``, ...)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, list):
            out.update({f"{k}_{i}": x for i, x in enumerate(v)})
        else:
            out[k] = v
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``; FileNotFoundError naming the file if absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here (is {run_dir} a run folder of mlaan-fast train?)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(rows: list[dict], **about) -> dict:
    """The run in one dict: ``about`` (arch, device, ...) plus final/best accuracy, time, speed, memory."""
    if not rows:
        return {**about, "epochs": 0}
    return {**about, "epochs": rows[-1]["epoch"], "final_test_acc": rows[-1]["test_acc"],
            "best_test_acc": max(r["test_acc"] for r in rows),
            "train_time_s": sum(r["epoch_time_s"] for r in rows),
            "mean_images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
            "peak_bytes": max((r["peak_bytes"] or 0 for r in rows), default=0) or None,
            "peak_kind": rows[-1]["peak_kind"]}


def write_summary(run_dir: str | Path, summary: dict) -> None:
    """Write ``run_dir/summary.json``."""
    with open(Path(run_dir) / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")


def format_bytes(n: int | None) -> str:
    """``n`` bytes as '12.3 MiB' ('n/a' for None)."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
