"""``lowbit export RUN``: a run folder's final model as a ``.lowbit`` or ONNX file.

The input shape and the input normalisation come from the folder's ``run.json`` (no data set
is loaded); only the exporters' public functions are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..export import export
from ..export.onnx import export_onnx
from .folder import load_run, run_preprocess

FORMATS = ("lowbit", "onnx")


def export_run(
    run_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    format: str = "lowbit",
    ternary_layout: str = "5trit",
) -> Path:
    """Export the final model of ``run_dir`` (default ``RUN/model.lowbit`` or ``.onnx``).

    The ``.lowbit`` file records the run's input normalisation (``preprocess``), so
    ``lowbit run`` can classify raw images. Returns the written path.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    run_dir = Path(run_dir)
    out = Path(out_path) if out_path is not None else run_dir / f"model.{format}"
    _, model, info = load_run(run_dir)
    if format == "onnx":
        export_onnx(
            model, out, torch.zeros((1, *info["in_shape"])), preprocess=run_preprocess(run_dir)
        )
        return out
    return export(
        model,
        out,
        example_input=tuple(info["in_shape"]),
        ternary_layout=ternary_layout,
        preprocess=run_preprocess(run_dir),
    )
