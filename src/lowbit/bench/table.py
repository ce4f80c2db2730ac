"""The bench's results table: per-method means over seeds, goals, and its three file formats.

Columns: method, bits w/a (inner layers; first and last layer are 8-bit or float by recipe),
top-1 on the test split (mean and sample standard deviation over seeds, in %), delta vs float32
(points, mean of the per-seed differences), model size (bytes) and its ratio to float32's,
sparsity (share of zero quantised weights) and the QAT step-time overhead (training-step time
over float32's). Written as ``results.json`` (everything), ``results.csv`` (numbers) and
``results.md`` (the Markdown table and the goals), and printed with ``rich``.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..term import print_table
from .config import FLOAT32, BenchConfig

CSV_FIELDS = (
    "method",
    "kind",
    "bits_w",
    "bits_a",
    "seeds",
    "top1_mean",
    "top1_std",
    "delta_mean",
    "delta_std",
    "val_top1_mean",
    "size_bytes",
    "size_ratio",
    "size_source",
    "sparsity",
    "step_overhead",
    "health_warnings",
)
HEADERS = (
    "method",
    "bits w/a",
    "top-1 %",
    "Δ vs float32",
    "size (bytes)",
    "ratio",
    "sparsity",
    "QAT step time",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _row(
    name: str,
    runs: list[Mapping[str, Any]],
    fp_by_seed: Mapping[int, float],
    fp_size: float,
    timing: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """One table row from the runs (one per seed) of method ``name``."""
    top1 = [100 * r["test_acc"] for r in runs]
    deltas = [
        100 * (r["test_acc"] - fp_by_seed[r["seed"]]) for r in runs if r["seed"] in fp_by_seed
    ]
    mean, std = _mean_std(top1)
    delta_mean, delta_std = _mean_std(deltas) if deltas else (None, None)
    size = statistics.fmean(r["size_bytes"] for r in runs)
    sparsities = [r["sparsity"] for r in runs if r["sparsity"] is not None]
    first = runs[0]
    return {
        "method": name,
        "kind": first["kind"],
        "bits_w": first["bits_w"],
        "bits_a": first["bits_a"],
        "seeds": len(runs),
        "top1_mean": mean,
        "top1_std": std,
        "delta_mean": delta_mean,
        "delta_std": delta_std,
        "val_top1_mean": statistics.fmean(100 * r["val_acc"] for r in runs),
        "size_bytes": round(size),
        "size_ratio": fp_size / size,
        "size_source": first["size_source"],
        "sparsity": statistics.fmean(sparsities) if sparsities else None,
        "step_overhead": timing.get(name, {}).get("overhead"),
        "health_warnings": sum(len(r["health"]) for r in runs),
    }


def aggregate(
    bench: BenchConfig,
    runs: Sequence[Mapping[str, Any]],
    timing: Mapping[str, Mapping[str, float]],
) -> list[dict[str, Any]]:
    """One row per method of ``bench`` (in bench order) from the per-seed ``runs``."""
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    fp_runs = by_method[FLOAT32]
    fp_by_seed = {r["seed"]: r["test_acc"] for r in fp_runs}
    fp_size = statistics.fmean(r["size_bytes"] for r in fp_runs)
    return [
        _row(m.name, by_method[m.name], fp_by_seed, fp_size, timing)
        for m in bench.methods
        if m.name in by_method
    ]


def bits_label(row: Mapping[str, Any]) -> str:
    """``"w/a"`` bits, ``"32/32"`` for float."""
    return f"{row['bits_w']:g}/{row['bits_a']}"


def check_goals(bench: BenchConfig, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of ``bench`` per method: ``{"goal", "method", "value", "target", "met"}``.

    ``max_drop``: ``value`` is the drop ``float32 - method`` in points (mean top-1), met when
    ``<= target``. ``beats_ptq``: for every QAT row with a post-training row of the same bits,
    ``value`` is the QAT top-1 minus the PTQ top-1, met when ``> 0``.
    """
    by_name = {r["method"]: r for r in rows}
    fp = by_name[FLOAT32]["top1_mean"]
    out: list[dict[str, Any]] = []
    for goal in bench.goals:
        if goal.max_drop is not None:
            for name in goal.methods:
                if name in by_name:
                    drop = fp - by_name[name]["top1_mean"]
                    out.append(
                        {
                            "goal": f"within {goal.max_drop:g} points of float32",
                            "method": name,
                            "value": drop,
                            "target": goal.max_drop,
                            "met": drop <= goal.max_drop + 1e-9,
                        }
                    )
        if goal.beats_ptq:
            out += _beats_ptq(rows)
    return out


def _beats_ptq(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    ptq = {bits_label(r): r for r in rows if r["kind"] == "ptq"}
    out = []
    for r in rows:
        base = ptq.get(bits_label(r))
        if r["kind"] == "qat" and base is not None:
            margin = r["top1_mean"] - base["top1_mean"]
            out.append(
                {
                    "goal": f"beats {base['method']}",
                    "method": r["method"],
                    "baseline": base["method"],
                    "value": margin,
                    "target": 0.0,
                    "met": margin > 0,
                }
            )
    return out


# -- formatting --------------------------------------------------------------------------------
def _pm(mean: float | None, std: float | None, signed: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def format_row(row: Mapping[str, Any]) -> list[str]:
    """The row as the strings of :data:`HEADERS`."""
    overhead = row["step_overhead"]
    return [
        row["method"],
        bits_label(row),
        _pm(row["top1_mean"], row["top1_std"]),
        "-" if row["method"] == FLOAT32 else _pm(row["delta_mean"], row["delta_std"], True),
        f"{row['size_bytes']:,}",
        f"{row['size_ratio']:.1f}x",
        "-" if row["sparsity"] is None else f"{row['sparsity']:.1%}",
        "-" if overhead is None else f"{overhead:.2f}x",
    ]


def size_header(rows: Sequence[Mapping[str, Any]]) -> str:
    """The size column's header: measured file bytes, or the summary estimate, said so."""
    if all(r["size_source"] == "export" for r in rows):
        return "size (bytes, .lowbit file)"
    if all(r["size_source"] == "summary" for r in rows):
        return "size (bytes, lowbit.summary estimate: no exporter)"
    return "size (bytes; * = lowbit.summary estimate)"


def headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = list(HEADERS)
    cols[4] = size_header(rows)
    return cols


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    mixed = len({r["size_source"] for r in rows}) > 1
    cells = []
    for r in rows:
        row = format_row(r)
        if mixed and r["size_source"] == "summary":
            row[4] += "*"
        cells.append(row)
    return cells


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table in GitHub Markdown."""
    cols = headers(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["--:"] * 7) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in _cells(rows)]
    return "\n".join(lines)


def goal_lines(goals: Sequence[Mapping[str, Any]]) -> list[str]:
    """One Markdown bullet per goal check: met or MISSED, with the figure."""
    lines = []
    for g in goals:
        mark = "met" if g["met"] else "**MISSED**"
        if g["goal"].startswith("within"):
            figure = f"drop {g['value']:+.2f} points"
        else:
            figure = f"margin {g['value']:+.2f} points"
        lines.append(f"- {g['method']}: {g['goal']} -- {mark} ({figure})")
    return lines


def budget_text(budget: Mapping[str, int]) -> str:
    """The training budget in words: shared float32 pre-training, or every row from scratch."""
    if not budget["pretrain_epochs"]:
        return f"every row trains {budget['train_epochs']} epochs from scratch"
    return (
        f"per seed {budget['pretrain_epochs']} float32 epochs, then {budget['train_epochs']} "
        "fine-tune epochs for every row from that checkpoint"
    )


def rich_table(results: Mapping[str, Any]) -> Table:
    rows = results["rows"]
    title = f"lowbit bench accuracy: {results['bench']}" + (" (quick)" if results["quick"] else "")
    table = Table(title=title)
    for i, col in enumerate(headers(rows)):
        table.add_column(col, justify="left" if i < 2 else "right")
    for cells in _cells(rows):
        table.add_row(*cells)
    table.caption = (
        f"mean ± std over {results['seeds']} seed(s); top-1 on the test split; "
        f"{budget_text(results['budget'])}"
    )
    return table


def show_results(results: Mapping[str, Any], console: Console) -> None:
    print_table(console, rich_table(results))
    for line in goal_lines(results["goals"]):
        console.print(line, highlight=False)


def write_tables(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json``, ``results.csv`` and ``results.md`` in ``out``."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in results["rows"]:
            writer.writerow({k: row[k] for k in CSV_FIELDS})
    md = [f"# Accuracy bench: {results['bench']}", "", markdown_table(results["rows"]), ""]
    if results["goals"]:
        md += ["## Goals", "", *goal_lines(results["goals"]), ""]
    (out / "results.md").write_text("\n".join(md))
