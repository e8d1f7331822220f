"""Per-epoch metrics on disk: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv``, and
``summary.json`` at the end of a run."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from mlaan_fast.train.runfolder import atomic_write_text


class MetricsLog:
    """One row per epoch in ``run_dir/metrics.jsonl`` (and ``metrics.csv``), rewritten whole and atomically
    on every change: a crash leaves the previous file or the new one, never a torn line."""

    def __init__(self, run_dir: str | Path, rows: list[dict] | None = None):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        if rows is None:
            rows = read_metrics(self.run_dir) if self.jsonl.exists() else []
        self.rows = list(rows)

    def keep_epochs_before(self, epoch: int) -> None:
        """Forget rows of epochs >= ``epoch`` (a resumed run rewrites them)."""
        self.rows = [r for r in self.rows if r["epoch"] < epoch]
        self._rewrite()

    def replace(self, rows: list[dict]) -> None:
        """Make ``rows`` the whole log (a resumed run takes them from its checkpoint)."""
        self.rows = list(rows)
        self._rewrite()

    def append(self, row: dict) -> None:
        """Add one epoch's row; ValueError (and nothing written) if it holds NaN or inf."""
        json.dumps(row, allow_nan=False)
        self.rows.append(row)
        self._rewrite()

    def _rewrite(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.rows))
        self._write_csv()

    def _write_csv(self) -> None:
        flat = [_flatten(r) for r in self.rows]
        columns = list(dict.fromkeys(k for r in flat for k in r))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        atomic_write_text(self.csv, text.getvalue())


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
    """The rows of ``run_dir/metrics.jsonl``, skipping a torn (half-written) last line;
    FileNotFoundError naming the file if absent, ValueError naming the line if another is damaged."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics here (is {run_dir} a run folder of mlaan-fast train?)")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(numbered):
        row = _parse_row(line)
        if row is None and i == len(numbered) - 1:
            break  # torn by a crash while it was written: that epoch is not recorded
        if row is None:
            raise ValueError(f"{path}, line {n}: not a metrics row ({line[:60]!r}); "
                             "restore the file or delete that line")
        rows.append(row)
    return rows


def _parse_row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("epoch"), int) else None


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
    """Write ``run_dir/summary.json`` (atomically)."""
    atomic_write_text(Path(run_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


def format_bytes(n: int | None) -> str:
    """``n`` bytes as '12.3 MiB' ('n/a' for None)."""
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
