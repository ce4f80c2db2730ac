"""Report sections of one run folder (``lowbit train`` or one row of a bench).

Three figures, each from the run's own files: TTQ's ``Wp``/``Wn`` per layer over training
(``qat/scalars.jsonl``), the weight histograms before and after quantisation and the per-layer
sparsity (both from the final checkpoint, rebuilt with :func:`lowbit.runs.load_run`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..runs.folder import load_run
from ..runs.results import read_results
from .collect import layer_sparsity, ttq_trajectories, weight_pairs
from .figures import FigureFiles
from .plots import plot_layer_sparsity, plot_ttq_trajectories, plot_weight_histograms


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def summary_lines(run_dir: Path) -> list[str]:
    """The run's headline numbers from its ``results.json`` (any kind of run folder)."""
    try:
        r = read_results(run_dir)
    except ValueError:
        return ["(no results.json: the run has not finished)"]
    method = r.get("method") or "float32"
    fp = r.get("fp", {}).get("test", {}).get("acc")
    lines = []
    if fp is not None and r.get("kind") != "float":
        lines.append(f"- float32 phase test top-1: {_percent(fp)}")
    lines.append(
        f"- {method} ({r.get('kind')}) test top-1 {_percent(r.get('test_acc'))}, validation "
        f"top-1 {_percent(r.get('val_acc'))}"
    )
    if r.get("test_bpb") is not None:  # a language model (top-1: next-byte accuracy)
        lines.append(f"- test bits per byte: {r['test_bpb']:.4f}")
    if r.get("bits_w") is not None:
        lines.append(
            f"- bits w/a {r['bits_w']:g}/{r['bits_a']}, sparsity {_percent(r['sparsity'])}"
        )
    if r.get("size_bits") is not None:
        ratio = (
            ""
            if r.get("compression") is None
            else f", {r['compression']:.1f}x smaller than float32"
        )
        lines.append(f"- size {r['size_bits'] / 8192:.1f} KiB (lowbit.summary){ratio}")
    if r.get("size_source") == "export":
        lines.append(f"- exported .lowbit file: {r['size_bytes']:,} bytes")
    return lines


def ttq_section(run_dir: Path, figures: FigureFiles, name: str) -> list[str]:
    """TTQ's Wp/Wn trajectories and their final values, or a line saying there are none."""
    trajectories = ttq_trajectories(run_dir / "qat" / "scalars.jsonl")
    if not trajectories:
        return ["No TTQ scales were logged in this run (not a TTQ run)."]
    png = plot_ttq_trajectories(trajectories, figures.path(f"{name}-ttq_wp_wn"))
    lines = [
        figures.link(png, "TTQ Wp and Wn per layer over training"),
        "",
        "| layer | Wp (epoch 1 → last) | Wn (epoch 1 → last) |",
        "|---|--:|--:|",
    ]
    for layer, t in trajectories.items():
        lines.append(
            f"| {layer} | {t['wp'][0]:.4f} → {t['wp'][-1]:.4f} | "
            f"{t['wn'][0]:.4f} → {t['wn'][-1]:.4f} |"
        )
    return lines


def weights_section(model: nn.Module, figures: FigureFiles, name: str) -> list[str]:
    """Histograms of each quantised layer's float and quantised weights."""
    pairs = weight_pairs(model)
    if not pairs:
        return ["The model has no quantised layer (float run): nothing to compare."]
    png = plot_weight_histograms(pairs, figures.path(f"{name}-weight_histograms"))
    return [figures.link(png, "weight histograms before and after quantisation")]


def sparsity_section(
    by_run: dict[str, dict[str, float]], figures: FigureFiles, name: str
) -> list[str]:
    """Per-layer sparsity bars and table (one column per run)."""
    by_run = {run: shares for run, shares in by_run.items() if shares}
    if not by_run:
        return ["No quantised layer: no sparsity to show."]
    png = plot_layer_sparsity(by_run, figures.path(f"{name}-layer_sparsity"))
    layers: list[str] = []
    for shares in by_run.values():
        layers += [layer for layer in shares if layer not in layers]
    runs = list(by_run)
    lines = [
        figures.link(png, "per-layer sparsity"),
        "",
        "| layer | " + " | ".join(runs) + " |",
        "|---|" + "--:|" * len(runs),
    ]
    for layer in layers:
        cells = [_percent(by_run[r].get(layer)) for r in runs]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines


def run_sections(run_dir: Path, figures: FigureFiles, name: str = "run") -> list[str]:
    """The Markdown body for one run folder (headings at level 3)."""
    exp, model, _ = load_run(run_dir)
    lines = [
        f"Experiment `{exp.name}`" + (f": {exp.description}" if exp.description else ""),
        "",
        *summary_lines(run_dir),
        "",
        "### TTQ: Wp and Wn per layer over training",
        "",
        *ttq_section(run_dir, figures, name),
        "",
        "### Weights before and after quantisation",
        "",
        *weights_section(model, figures, name),
        "",
        "### Per-layer sparsity (share of zero quantised weights)",
        "",
        *sparsity_section(
            {exp.quant.name if exp.quant else "float": layer_sparsity(model)}, figures, name
        ),
    ]
    return lines


def run_report(run_dir: Path, figures: FigureFiles) -> str:
    """The whole Markdown report of one run folder."""
    return "\n".join(
        [f"# lowbit run report: {run_dir.name}", "", *run_sections(run_dir, figures), ""]
    )
