"""The inference graph of a finished run folder (for ``lowbit export``, both formats)."""

from __future__ import annotations

import os
from pathlib import Path

from ..contract import Graph
from .graph_builder import build_graph

__all__ = ["run_graph"]


def run_graph(run_dir: str | os.PathLike[str]) -> Graph:
    """The graph of a run folder's final model, with the run, experiment and dataset in its
    ``meta`` and the dataset's input normalisation as ``meta["preprocess"]``."""
    from ..train.experiment import load_data, load_run

    exp, model, info = load_run(Path(run_dir))
    test = load_data(exp, exp.train.seed).test
    graph = build_graph(model, tuple(info["in_shape"]))
    graph.meta.update(run=str(run_dir), experiment=exp.name, dataset=info.get("dataset"))
    if hasattr(test, "scale") and hasattr(test, "mean") and hasattr(test, "std"):
        graph.meta["preprocess"] = {
            "scale": float(test.scale),
            "mean": [float(v) for v in test.mean.reshape(-1)],
            "std": [float(v) for v in test.std.reshape(-1)],
        }
    return graph
