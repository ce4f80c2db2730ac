"""ONNX files written by ``lowbit export --format onnx``, run by onnxruntime (CPU), with the
interface of :class:`~lowbit.runtime.Model` that ``lowbit run`` uses (``input_shape``, ``meta``
with the ``preprocess`` normalisation from the file's ``metadata_props``, ``predict``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .model import Prediction, top_classes

__all__ = ["PREPROCESS_KEY", "OnnxModel"]

PREPROCESS_KEY = "lowbit.preprocess"
"""``metadata_props`` key of the input normalisation (JSON ``{"scale", "mean", "std"}``)."""


class OnnxModel:
    """An ONNX classifier on onnxruntime's CPU provider; ``model(x)`` gives logits."""

    engine = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import onnxruntime as ort

        self.source = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            self.session = ort.InferenceSession(self.source, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err)
            raise ValueError(f"{path}: not an ONNX model onnxruntime can run ({why})") from None
        inp = self.session.get_inputs()[0]
        dims = inp.shape[1:]
        if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
            raise ValueError(f"{path}: the input must have a fixed per-sample shape, got {dims}")
        self.input_name = inp.name
        self.input_shape = [int(d) for d in dims]
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta: dict[str, Any] = {}
        if PREPROCESS_KEY in props:
            try:
                pre = json.loads(props[PREPROCESS_KEY])
            except ValueError:
                pre = None
            if not isinstance(pre, dict):
                raise ValueError(f"{path}: metadata {PREPROCESS_KEY!r} is not a JSON object")
            self.meta["preprocess"] = pre

    def __call__(self, x: NDArray[Any]) -> NDArray[np.float32]:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu" or arr.ndim < 2 or list(arr.shape[1:]) != self.input_shape:
            raise ValueError(
                f"x must be a real array of shape [N, {', '.join(map(str, self.input_shape))}], "
                f"got dtype {arr.dtype} and shape {list(arr.shape)}"
            )
        (logits,) = self.session.run(None, {self.input_name: arr.astype(np.float32)})
        return np.asarray(logits, np.float32)

    def predict(self, x: NDArray[Any], top_k: int = 5) -> Prediction:
        """Top-``top_k`` classes (best first) and their softmax probabilities."""
        return top_classes(self(x), top_k)
