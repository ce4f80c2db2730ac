"""The float engine's parameter-free ops (graph layout ``[N, C, H, W]``) and layout changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..contract import Node
from .geometry import pool_geometry
from .shapes import pads, slices

__all__ = ["NODE_OPS", "batchnorm", "clamp", "pool", "to_channels_first", "to_channels_last"]

F32 = np.float32


def to_channels_last(x: NDArray[Any]) -> NDArray[Any]:
    """``[N, C, H, W]`` as a contiguous ``[N, H, W, C]`` array."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def to_channels_first(x: NDArray[Any]) -> NDArray[Any]:
    """``[N, H, W, C]`` as a contiguous ``[N, C, H, W]`` array."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def pool(node: Node, x: NDArray[np.float32], op: str) -> NDArray[np.float32]:
    geo = pool_geometry(node)
    if op == "maxpool2d":
        return geo.windows(x, pad_value=-np.inf).max(axis=(4, 5))
    area = F32(geo.kernel[0] * geo.kernel[1])
    return (geo.windows(x, pad_value=0).sum(axis=(4, 5), dtype=F32) / area).astype(F32)


def batchnorm(node: Node, x: NDArray[np.float32]) -> NDArray[np.float32]:
    view = (1, -1) + (1,) * (x.ndim - 2)
    scale = np.asarray(node.params["scale"], F32).reshape(view)
    shift = np.asarray(node.params["shift"], F32).reshape(view)
    return x * scale + shift


def clamp(node: Node, x: NDArray[np.float32]) -> NDArray[np.float32]:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return np.clip(x, None if lo is None else F32(lo), None if hi is None else F32(hi))


NODE_OPS: dict[str, Callable[[Node, list[NDArray[np.float32]]], NDArray[np.float32]]] = {
    "batchnorm": lambda n, a: batchnorm(n, a[0]),
    "relu": lambda n, a: np.maximum(a[0], F32(0)),
    "clamp": lambda n, a: clamp(n, a[0]),
    "maxpool2d": lambda n, a: pool(n, a[0], "maxpool2d"),
    "avgpool2d": lambda n, a: pool(n, a[0], "avgpool2d"),
    "global_avgpool2d": lambda n, a: a[0].mean(axis=(2, 3), keepdims=True, dtype=F32),
    "flatten": lambda n, a: a[0].reshape(*a[0].shape[: n.attrs.get("start_dim", 1)], -1),
    "add": lambda n, a: a[0] + a[1],
    "slice": lambda n, a: np.ascontiguousarray(a[0][slices(n, a[0].ndim)]),
    "pad": lambda n, a: np.pad(a[0], pads(n, a[0].ndim)),
}
