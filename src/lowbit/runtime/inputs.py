"""Model inputs from files (``.npy`` arrays and images) and ``lowbit run``'s classification."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .loader import load
from .model import Model
from .onnx_model import OnnxModel

__all__ = ["classify", "read_input"]

F32 = np.float32


def read_input(path: str | Path, model: Model | OnnxModel) -> NDArray[np.float32]:
    """One input batch for ``model`` from a ``.npy`` array or an image file (PNG, ...).

    Images and ``uint8`` arrays are raw pixels: they are scaled and normalised with the file's
    ``meta["preprocess"]`` (``x * scale - mean) / std`` per channel) when it has one. Float
    arrays are taken as model inputs as they are. A single sample (``input_shape``) gets a batch
    dimension; the shape must otherwise be ``[N, *input_shape]``.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; give an image file or a .npy array")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            raise ValueError(f"{path}: not a readable .npy array") from None
        raw = arr.dtype == np.uint8
    else:
        arr = _read_image(path, model.input_shape)
        raw = True
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    if list(arr.shape) == model.input_shape:
        arr = arr[None]
    if list(arr.shape[1:]) != model.input_shape:
        raise ValueError(
            f"{path}: shape {list(arr.shape)} does not fit the model input {model.input_shape}"
        )
    return _preprocess(arr, model.meta.get("preprocess")) if raw else arr.astype(F32)


def _read_image(path: Path, shape: list[int]) -> NDArray[np.uint8]:
    from PIL import Image

    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"{path}: images need a model with 1 or 3 input channels, got {shape}")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L" if shape[0] == 1 else "RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, ValueError):  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{path}: not an image (PNG, JPEG, ...) or a .npy array") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _preprocess(arr: NDArray[Any], pre: dict[str, Any] | None) -> NDArray[np.float32]:
    x = arr.astype(F32)
    if not pre:
        return x
    x = x * F32(pre.get("scale", 1.0))
    c = x.shape[1]
    mean = np.asarray(pre.get("mean", [0.0] * c), F32).reshape(1, c, *([1] * (x.ndim - 2)))
    std = np.asarray(pre.get("std", [1.0] * c), F32).reshape(1, c, *([1] * (x.ndim - 2)))
    return (x - mean) / std


def classify(
    model_or_path: Model | OnnxModel | str | Path, inputs: Sequence[str | Path], top_k: int = 5
) -> list[tuple[str, list[tuple[int, float]]]]:
    """Top-``top_k`` ``(class, probability)`` pairs for every sample of every input file.

    For ``lowbit run model.lowbit INPUT...``: each entry is ``(label, pairs)`` with label
    ``"file"`` (or ``"file[i]"`` for sample ``i`` of a batch file).
    """
    model = model_or_path if isinstance(model_or_path, (Model, OnnxModel)) else load(model_or_path)
    results: list[tuple[str, list[tuple[int, float]]]] = []
    for path in inputs:
        batch = read_input(path, model)
        pred = model.predict(batch, top_k)
        for i in range(batch.shape[0]):
            label = str(path) if batch.shape[0] == 1 else f"{path}[{i}]"
            pairs = [
                (int(c), float(p)) for c, p in zip(pred.indices[i], pred.probs[i], strict=True)
            ]
            results.append((label, pairs))
    return results
