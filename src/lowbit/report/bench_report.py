"""The report of a bench folder (``lowbit bench accuracy``): the command that regenerates it,
the machine, the table, the goals (a paragraph per missed goal, with its figure), the plots,
and the other packaged benches with their commands.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..bench.config import FLOAT32, BenchConfig, BenchConfigError, bench_names, load_bench
from ..bench.machine import describe
from ..bench.table import budget_text, goal_lines, markdown_table
from ..data import load_dataset
from ..runs.folder import load_run
from .collect import layer_sparsity
from .figures import FigureFiles, shown_path
from .plots import plot_accuracy_vs_bits, plot_accuracy_vs_size
from .runs import run_sections, sparsity_section

SHOWCASE = "ttq"  # the row whose run gets the TTQ / histogram figures (else the first QAT row)


def is_bench_folder(path: Path) -> bool:
    file = path / "results.json"
    return file.is_file() and "rows" in json.loads(file.read_text())


def regenerate_command(results: Mapping[str, Any], run_dir: Path, output: Path) -> str:
    quick = " --quick" if results["quick"] else ""
    return (
        f"lowbit bench accuracy --suite {results['bench']}{quick} --seeds "
        f"{results['seeds']} --out {shown_path(run_dir)} && "
        f"lowbit report {shown_path(run_dir)} -o {shown_path(output)}"
    )


def time_line(compute_s: float, session_s: float) -> str:
    """The bench's cost from scratch, and the session's when it reused earlier parts."""
    line = f"{compute_s / 60:.1f} min for the whole bench (pre-training, every row, timing)"
    if session_s < 0.9 * compute_s:
        line += f"; the last session took {session_s / 60:.1f} min, reusing finished parts"
    return line


def setup_lines(results: Mapping[str, Any]) -> list[str]:
    budget = results["budget"]
    load = results.get("timing_load_average")
    busy = (
        ""
        if load is None
        else (
            f" The QAT step times were measured with a 1-minute load average of {load:.1f} on "
            f"{results['machine']['cores']} cores; other work on the machine makes them noisy."
        )
    )
    return [
        f"- Machine: {describe(results['machine'])}.",
        f"- Time: {time_line(results['compute_time_s'], results['session_time_s'])}.",
        f"- {results['description']}.",
        f"- Model `{results['model']['name']}`, data `{results['data']['name']}`; "
        f"{results['seeds']} seed(s); {budget_text(budget)} "
        "(post-training rows: calibration of the float32 row only). The epoch kept is the best "
        "on the validation split carved from the training set; the test split is only "
        "evaluated." + busy,
    ]


def missed_paragraphs(
    goals: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
) -> list[str]:
    """One paragraph per missed goal, with the figures that miss it."""
    by_name = {r["method"]: r for r in rows}
    fp = by_name[FLOAT32]
    out = []
    for g in goals:
        if g["met"]:
            continue
        r = by_name[g["method"]]
        spread = "" if r["top1_std"] is None else f" ± {r['top1_std']:.2f}"
        if g["goal"].startswith("within"):
            why = (
                f"its mean top-1 is {r['top1_mean']:.2f}{spread} %, {g['value']:.2f} points "
                f"below float32's {fp['top1_mean']:.2f} % (goal: at most {g['target']:g})"
            )
        else:
            base = by_name[g["baseline"]]
            why = (
                f"its mean top-1 {r['top1_mean']:.2f}{spread} % does not exceed {base['method']}'s "
                f"{base['top1_mean']:.2f} % at the same bits (margin {g['value']:+.2f} points)"
            )
        out += [f"**{g['method']}** misses *{g['goal']}*: {why}, over {r['seeds']} seed(s).", ""]
    return out


def health_lines(results: Mapping[str, Any]) -> list[str]:
    warned = [(r["method"], r["seed"], m) for r in results["runs"] for m in r["health"]]
    if not warned:
        return ["No health warning (dead layer or collapsed activations) in any final model."]
    return ["Health warnings on final models:", ""] + [
        f"- {method} (seed {seed}): {message}" for method, seed, message in warned
    ]


def showcase_run(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> Path | None:
    """Seed 0's run of the TTQ row, else of the first QAT row; None if there is none."""
    names = [r["method"] for r in rows if r["kind"] == "qat"]
    if not names:
        return None
    name = SHOWCASE if SHOWCASE in names else names[0]
    return run_dir / "seed0" / name


def sparsity_by_row(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, dict]:
    """Seed 0's per-layer sparsity of every quantised row that has zero weights somewhere."""
    found = {}
    for r in rows:
        if r["kind"] != "float" and (run_dir / "seed0" / r["method"]).is_dir():
            shares = layer_sparsity(load_run(run_dir / "seed0" / r["method"])[1])
            if any(v > 0 for v in shares.values()):
                found[r["method"]] = shares
    return found


def availability(bench: BenchConfig) -> str:
    """Why a bench has no figures here: this machine's GPU and whether its data loads offline."""
    options = {k: v for k, v in bench.data.items() if k not in ("name", "download")}
    try:
        load_dataset(bench.data["name"], **options)
        data = "its data is present"
    except (OSError, ValueError) as err:
        data = f"its data was not found offline ({str(err).split(' (')[0]})"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"Not run for this page. The machine that wrote it has {gpu}; {data}."


def other_benches(current: str) -> list[str]:
    """The other packaged benches with their command and notes."""
    lines: list[str] = []
    for suite in bench_names():
        try:
            bench = load_bench(suite)
        except BenchConfigError:
            continue
        if bench.name == current:
            continue
        methods = ", ".join(m.name for m in bench.methods)
        lines += [
            f"### {bench.name}: {bench.description}",
            "",
            f"    lowbit bench accuracy --suite {suite} --out runs/bench-{bench.name}",
            "",
            f"Rows: {methods}. {availability(bench)}",
            "",
        ]
        if bench.notes:
            lines += [bench.notes.strip(), ""]
    return lines


def bench_report(run_dir: Path, output: Path, figures: FigureFiles) -> str:
    """The Markdown report of a bench folder."""
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["rows"]
    title = f"# lowbit accuracy bench: {results['bench']}" + (
        " (quick)" if results["quick"] else ""
    )
    lines = [
        title,
        "",
        "Regenerate this page (tables and figures) with:",
        "",
        f"    {regenerate_command(results, run_dir, output)}",
        "",
        "(An existing bench folder is resumed: its finished rows are reused. Delete it to start "
        "over.)",
        "",
        *setup_lines(results),
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "Top-1 on the test split, mean ± sample standard deviation over seeds; Δ is the "
        "mean per-seed difference to float32 in points. Bits w/a are those of the inner "
        "layers (32 = float); first and last layer follow each recipe (8-bit, or float "
        "for TTQ). Ratio = float32 size / size. Sparsity = share of zero quantised "
        "weights. QAT step time = training-step time over float32's (same batch).",
        "",
        *health_lines(results),
        "",
    ]
    if results["goals"]:
        lines += ["## Goals", "", *goal_lines(results["goals"]), ""]
        lines += [
            "A difference smaller than the ± spread between seeds is not significant, whether "
            "the goal reads met or missed.",
            "",
        ]
        lines += missed_paragraphs(results["goals"], rows)
    lines += [
        "## Plots",
        "",
        figures.link(
            plot_accuracy_vs_bits(rows, figures.path("accuracy_vs_bits")), "accuracy vs bits"
        ),
        "",
        figures.link(
            plot_accuracy_vs_size(rows, figures.path("accuracy_vs_size")), "accuracy vs model size"
        ),
        "",
        "### Per-layer sparsity of every row (seed 0)",
        "",
        *sparsity_section(sparsity_by_row(run_dir, rows), figures, "bench"),
        "",
    ]
    showcase = showcase_run(run_dir, rows)
    if showcase is not None and showcase.is_dir():
        lines += [
            f"## One run in detail: {showcase.name}, seed 0",
            "",
            *run_sections(showcase, figures, showcase.name),
            "",
        ]
    if results.get("notes"):
        lines += ["## Notes", "", results["notes"].strip(), ""]
    others = other_benches(results["bench"])
    if others:
        lines += ["## Other benches", "", *others]
    return "\n".join(lines)
