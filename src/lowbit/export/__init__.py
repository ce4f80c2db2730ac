"""Deploy what was trained: the ``.lowbit`` file (and, beside it, ONNX export).

    lowbit.export.export(model, "model.lowbit", example_input=(1, 28, 28))
    model = lowbit.runtime.load("model.lowbit")          # numpy only, no torch

:func:`export` builds the inference graph (:func:`build_graph`) and writes it
(:func:`write_graph`, format in :mod:`lowbit.runtime.loader`); :func:`export_run` does the same
for a finished run folder (``lowbit export RUN -o model.lowbit``).

This package module is itself callable, ``lowbit.export(model, path, ...)`` being
:func:`export`: the package and the function share the public name ``lowbit.export``.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .files import ExportError
from .graph_builder import build_graph, build_graph_with_values, example_tensor
from .lowbit_file import TERNARY_LAYOUTS, code_packing, graph_to_bytes, write_graph
from .run import run_graph

__all__ = [
    "TERNARY_LAYOUTS",
    "ExportError",
    "build_graph",
    "build_graph_with_values",
    "code_packing",
    "example_tensor",
    "export",
    "export_run",
    "graph_to_bytes",
    "run_graph",
    "write_graph",
]


def export(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_input: Tensor | Sequence[int] | None = None,
    ternary_layout: str = "5trit",
    fold_bn: bool = True,
    preprocess: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (quantised by :func:`lowbit.quantize`, or float) as a ``.lowbit`` file.

    Only what inference needs is stored: quantised weights as packed integer codes with their
    float32 scales (binary 1 bit, ternary 1.6 bits or 2 bits with ``ternary_layout="2bit"``,
    n-bit codes densely), float layers and biases in float32, BatchNorm as per-channel
    scale/shift (folded into a preceding float layer with ``fold_bn``). ``example_input`` is a
    batch tensor or the per-sample input shape, e.g. ``(1, 28, 28)``; ``preprocess``
    (``{"scale", "mean", "std"}``) records how raw pixels become model inputs, for
    ``lowbit run``. Returns the path; the file is written atomically.
    """
    graph = build_graph(model, example_input, fold_bn=fold_bn)
    if preprocess is not None:
        graph.meta["preprocess"] = dict(preprocess)
    return write_graph(graph, path, ternary_layout=ternary_layout)


def export_run(
    run_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    ternary_layout: str = "5trit",
) -> Path:
    """Export the final model of a run folder (``lowbit export RUN -o model.lowbit``).

    The input shape, the recipe and the dataset's normalisation (stored as ``preprocess``,
    so ``lowbit run`` can classify raw images) come from the run folder.
    """
    return write_graph(run_graph(run_dir), out_path, ternary_layout=ternary_layout)


class _CallableModule(types.ModuleType):
    """``lowbit.export`` is both this package and the function :func:`export`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
