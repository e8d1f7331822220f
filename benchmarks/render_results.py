"""Render the benchmark CSVs as markdown tables: the README's "Performance" section, generated.

Every table is headed by the device, torch/triton versions, date and commit of its numbers;
nothing is typed by hand. A run whose every row a later run measured again is not shown.

  python benchmarks/render_results.py                      # print markdown for benchmarks/results/*.csv
  python benchmarks/render_results.py --results DIR --out summary.md
  python benchmarks/render_results.py --readme README.md   # rewrite the block between the markers
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
PROVENANCE = ("device", "torch", "triton", "date", "commit")
METHOD_ORDER = ["e2e", "dgl", "infopro", "mlaan", "dgl+mlaan", "infopro+mlaan"]
VARIANT_ORDER = ["straightforward", "fused", "scheduled", "compiled", "graphed"]
SHAPE = re.compile(r"(?P<arch>\S+) K=(?P<K>\d+) B=(?P<B>\d+) (?P<dtype>\S+)")


def read_rows(paths: list[str]) -> list[dict]:
    """The rows of every run (device, versions, date, commit) that holds a row no later run measured
    again; newest per (device, op, provider, shape, metric) within a run; file order kept."""
    newest: dict[tuple, dict] = {}
    per_run: dict[tuple, dict] = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                r["_file"] = os.path.basename(path)
                key = (r.get("device"), r.get("op"), r.get("provider"), r.get("shape"), r.get("metric"))
                newest[key] = r
                per_run[tuple(r.get(k, "") for k in PROVENANCE) + key] = r
    shown = {tuple(r.get(k, "") for k in PROVENANCE) for r in newest.values()}
    return [r for k, r in per_run.items() if k[: len(PROVENANCE)] in shown]


def _num(text: str, digits: int = 3) -> str:
    if text in (None, ""):
        return ""
    x = float(text)
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    return f"{x:.2e}"


def _spread(r: dict) -> str:
    text = _num(r["p50"])
    if r.get("p20") and r.get("p80") and r["p20"] != r["p80"]:
        text += f" ({_num(r['p20'])}–{_num(r['p80'])})"
    return text


def _ratio(row: dict | None, base: dict | None) -> str:
    if not row or not base or not float(base["p50"]):
        return ""
    return f"{float(row['p50']) / float(base['p50']):.3g}"


def _heading(meta: dict) -> str:
    return (
        f"**{meta['device']}** · torch {meta['torch']} · triton {meta['triton']} · "
        f"{meta['date']} · commit {meta['commit']}"
    )


def _groups(rows: list[dict], extra=lambda r: ()) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in PROVENANCE) + extra(r), []).append(r)
    return groups


def render_train_step(rows: list[dict]) -> list[str]:
    """One table per (device, versions, date, batch, dtype): a row per config, method and variant."""
    parsed = []
    for r in rows:
        m = SHAPE.fullmatch(r["shape"])
        if not m:
            continue
        method, _, variant = r["provider"].partition("/")
        parsed.append(
            dict(r, arch=m["arch"], K=int(m["K"]), B=m["B"], dtype=m["dtype"], method=method, variant=variant)
        )
    out = []
    for key, group in _groups(parsed, lambda r: (r["B"], r["dtype"])).items():
        meta = dict(zip(PROVENANCE, key))
        out += [f"Training step, batch {key[-2]}, {key[-1]}: {_heading(meta)}", ""]
        has_cuda = any(r["metric"] == "cuda_max_allocated" for r in group)
        has_compile = any(r["metric"] == "compile_time" for r in group)
        header = [
            "arch",
            "K",
            "method",
            "variant",
            "step ms p50 (p20–p80)",
            "images/s",
            "time × e2e",
            "speed × straightforward",
            "saved-activation peak MiB",
            "peak × e2e",
        ]
        header += ["CUDA max allocated MiB"] if has_cuda else []
        header += ["total memory MiB"]
        header += ["compile s", "speed × eager"] if has_compile else []
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        cells: dict[tuple, dict[str, dict]] = {}
        for r in group:
            cells.setdefault((r["arch"], r["K"], r["method"], r["variant"]), {})[r["metric"]] = r

        def order(k):
            arch, K, method, variant = k
            return (
                int(re.sub(r"\D", "", arch) or 0),
                K,
                METHOD_ORDER.index(method) if method in METHOD_ORDER else 99,
                VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else 99,
            )

        e2e_act = {k[0]: c["act_peak"] for k, c in cells.items() if k[2] == "e2e" and "act_peak" in c}
        for k in sorted(cells, key=order):
            c = cells[k]
            get = lambda metric, c=c: _num(c[metric]["p50"]) if metric in c else ""  # noqa: E731
            line = [
                k[0],
                str(k[1]),
                k[2],
                k[3],
                _spread(c["step_time"]) if "step_time" in c else "",
                get("images_per_s"),
                get("step_time_vs_e2e"),
                get("speedup_vs_straightforward"),
                get("act_peak"),
                _ratio(c.get("act_peak"), e2e_act.get(k[0])),
            ]
            line += [get("cuda_max_allocated")] if has_cuda else []
            line += [get("total_memory")]
            line += [get("compile_time"), get("speedup_vs_eager")] if has_compile else []
            out.append("| " + " | ".join(line) + " |")
        out += [
            "",
            "saved-activation peak: `mlaan_fast.profiling.ActivationMeter` (bytes saved for backward, "
            "parameters and buffers excluded); CUDA max allocated: `torch.cuda.max_memory_allocated` over "
            "one step; total: parameters + gradients + optimizer state + buffers + saved-activation peak. "
            + ("compile s: the compiled variant's first step less its median step; speed × eager: against "
               "the same step run eagerly (scheduled, or fused for e2e). " if has_compile else "")
            + "Ratios are between numbers of the same run on the same device.",
            "",
        ]
    return out


def render_generic(rows: list[dict], title: str) -> list[str]:
    """One table per (device, versions, date): a row per (op, shape, metric), a column per provider."""
    out = []
    for key, group in _groups(rows).items():
        meta = dict(zip(PROVENANCE, key))
        providers = list(dict.fromkeys(r["provider"] for r in group))
        out += [f"{title}: {_heading(meta)}", ""]
        header = ["op", "shape", "metric", "unit"] + providers
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table: dict[tuple, dict[str, dict]] = {}
        for r in group:
            table.setdefault((r["op"], r["shape"], r["metric"], r["unit"]), {})[r["provider"]] = r
        for (op, shape, metric, unit), by_provider in table.items():
            line = [op, shape, metric, unit] + [
                _spread(by_provider[p]) if p in by_provider else "" for p in providers
            ]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return out


def render(results_dir: str) -> str:
    """Markdown for every CSV in ``results_dir`` (train_step first)."""
    paths = sorted(
        glob.glob(os.path.join(results_dir, "*.csv")),
        key=lambda p: (os.path.basename(p) != "train_step.csv", p),
    )
    if not paths:
        return f"_No benchmark results in `{results_dir}` yet._\n"
    lines = []
    for path in paths:
        rows = read_rows([path])
        name = os.path.splitext(os.path.basename(path))[0]
        if not rows:
            continue
        lines += [f"### {name}", ""]
        lines += render_train_step(rows) if name == "train_step" else render_generic(rows, name)
    return "\n".join(lines).rstrip() + "\n"


def rewrite_readme(readme: str, block: str) -> None:
    """Replace the text between the perf markers of ``readme`` with ``block``."""
    with open(readme) as f:
        text = f.read()
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise SystemExit(f"{readme}: markers {BEGIN} ... {END} not found; add them where the tables belong")
    new = text[: start + len(BEGIN)] + "\n" + block + text[stop:]
    with open(readme, "w") as f:
        f.write(new)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of *.csv")
    p.add_argument("--out", default=None, help="also write the markdown to this file")
    p.add_argument("--readme", default=None, help="rewrite the block between the perf markers of this file")
    args = p.parse_args(argv)
    block = render(args.results)
    print(block, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(block)
    if args.readme:
        rewrite_readme(args.readme, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
