"""The report's figures as PNG files (matplotlib's object API with the Agg canvas).

No ``pyplot``: every figure is a :class:`matplotlib.figure.Figure` on its own
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so the global backend and state of a
user's session are left alone and nothing needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110
KIND_MARKER = {"float": "*", "qat": "o", "ptq": "s"}  # float32, QAT, post-training
SPREAD_STEP = 0.1  # rows of one bit width are drawn at bits * 2**(step * (k - (n - 1) / 2))


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not dominated by another with smaller-or-equal cost and higher-or-equal
    value (one of them strictly), sorted by cost: ``(cost, value)`` pairs."""
    front: list[tuple[float, float]] = []
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or value > front[-1][1]:
            front.append((cost, value))
    return front


def _scatter_rows(ax: Axes, rows: Sequence[Mapping[str, Any]], xs: Sequence[float]) -> None:
    """One marker per row at ``xs`` with its std over seeds as error bar; one colour per row
    (``tab20``), the marker by kind (o QAT, s post-training, * float32), named in the legend."""
    colours = colormaps["tab20"]
    for i, (r, x) in enumerate(zip(rows, xs, strict=True)):
        ax.errorbar(
            x,
            r["top1_mean"],
            yerr=r["top1_std"] or 0.0,
            fmt=KIND_MARKER[r["kind"]],
            color=colours(i % 20),
            markersize=8 if r["kind"] == "float" else 6,
            capsize=3,
            label=r["method"],
        )


def _finish(ax: Axes, front: list[tuple[float, float]], xlabel: str, title: str) -> None:
    """Pareto front, labels, grid and the legend outside the axes on the right."""
    ax.step(
        *zip(*front, strict=True), where="post", color="grey", ls="--", lw=1, label="Pareto front"
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def spread_bits(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """x positions on a log2 bits axis: the ``k``-th of ``n`` rows of one bit width (in row
    order) at ``bits * 2**(SPREAD_STEP * (k - (n - 1) / 2))``, so markers stand side by side."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["bits_w"], []).append(i)
    xs = [0.0] * len(rows)
    for bits, members in groups.items():
        for k, i in enumerate(members):
            xs[i] = bits * 2 ** (SPREAD_STEP * (k - (len(members) - 1) / 2))
    return xs


def plot_accuracy_vs_bits(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Top-1 against weight bits (inner layers; log2 axis), with the Pareto front. Rows of one
    bit width stand side by side (:func:`spread_bits`)."""
    fig = _figure(8.5, 4.8)
    ax = fig.add_subplot()
    _scatter_rows(ax, rows, spread_bits(rows))
    ax.set_xscale("log", base=2)
    ticks = sorted({r["bits_w"] for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    front = pareto_front([(r["bits_w"], r["top1_mean"]) for r in rows])
    _finish(ax, front, "weight bits (inner layers)", "Accuracy vs bits (mean ± std over seeds)")
    return _save(fig, path)


def plot_accuracy_vs_size(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Top-1 against model size in KiB (log axis), with the Pareto front (smaller and better)."""
    fig = _figure(8.5, 4.8)
    ax = fig.add_subplot()
    kib = [r["size_bytes"] / 1024 for r in rows]
    _scatter_rows(ax, rows, kib)
    ax.set_xscale("log")
    front = pareto_front([(k, r["top1_mean"]) for k, r in zip(kib, rows, strict=True)])
    _finish(ax, front, "model size (KiB)", "Accuracy vs model size (mean ± std over seeds)")
    return _save(fig, path)


def plot_ttq_trajectories(
    trajectories: Mapping[str, Mapping[str, Sequence[float]]], path: Path
) -> Path:
    """TTQ's ``Wp`` (solid) and ``-Wn`` (dashed) per layer over the epochs (Zhu et al., Fig. 3)."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    for i, (layer, t) in enumerate(trajectories.items()):
        colour = f"C{i % 10}"
        ax.plot(t["epoch"], t["wp"], color=colour, marker=".", label=f"{layer} Wp")
        ax.plot(
            t["epoch"],
            [-v for v in t["wn"]],
            color=colour,
            marker=".",
            ls="--",
            label=f"{layer} -Wn",
        )
    ax.axhline(0.0, color="black", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ternary value")
    ax.set_title("TTQ: learned positive (Wp) and negative (-Wn) values per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_weight_histograms(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, bins: int = 80
) -> Path:
    """Per layer: histogram of the float weights and, on top, of the quantised weights.

    The quantised weights take a few values only, so their histogram is a set of spikes at the
    levels; the y axis is logarithmic so both stay visible.
    """
    n = max(len(pairs), 1)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 2.8 * rows)
    for i, (layer, (latent, quantised)) in enumerate(pairs.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        lo = float(min(latent.min(), quantised.min()))
        hi = float(max(latent.max(), quantised.max()))
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
        ax.hist(latent, bins=edges, color="tab:blue", alpha=0.55, label="float (before)")
        ax.hist(quantised, bins=edges, color="tab:red", alpha=0.7, label="quantised (after)")
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=9)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("Weights before and after quantisation")
    return _save(fig, path)


def plot_layer_sparsity(by_run: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Grouped horizontal bars: share of zero quantised weights per layer, one bar per run."""
    layers: list[str] = []
    for shares in by_run.values():
        layers += [layer for layer in shares if layer not in layers]
    fig = _figure(8.5, 1.0 + 0.35 * max(len(layers), 1) * max(len(by_run), 1) ** 0.5)
    ax = fig.add_subplot()
    height = 0.8 / max(len(by_run), 1)
    y = np.arange(len(layers))
    colours = colormaps["tab20"]
    for i, (run, shares) in enumerate(by_run.items()):
        values = [100 * shares.get(layer, np.nan) for layer in layers]
        ax.barh(y + i * height, values, height=height, label=run, color=colours(i % 20))
    ax.set_yticks(y + 0.4 - height / 2, layers, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("zero quantised weights (%)")
    ax.set_title("Per-layer sparsity")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
