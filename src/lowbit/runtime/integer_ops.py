"""The integer engine's grids and its code-domain ops (see :mod:`lowbit.runtime.integer`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..contract import GraphError, Node
from ..fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
)

__all__ = [
    "WIDE_BITS",
    "Env",
    "Grid",
    "Op",
    "add_codes",
    "avgpool",
    "global_avgpool",
    "int_pair",
    "pass_op",
    "rescale",
    "uint8_offset",
]

WIDE_BITS = 20
"""Extra fraction bits of the wide int32 grids that averages and additions are computed on."""
Env = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class Grid:
    """An integer grid ``r = scale (q - zero_point)`` with codes ``q in [qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def wide(self) -> bool:
        return self.qmin == INT32_MIN and self.qmax == INT32_MAX

    def widened(self) -> Grid:
        """The same real line with ``WIDE_BITS`` more fraction bits and int32 codes."""
        if self.wide:
            return self
        scale = self.scale / 2**WIDE_BITS
        return Grid(scale, self.zero_point * 2**WIDE_BITS, INT32_MIN, INT32_MAX)

    def quantize(self, x: NDArray[Any]) -> NDArray[np.int32]:
        """``clip(round_half_even(x * (1 / S)) + Z, qmin, qmax)`` in float32.

        The product by the float32 reciprocal is what PyTorch's fake-quant kernels and
        lowbit's uniform quantisers compute, so codes agree with them bit for bit.
        """
        inv = np.float32(1.0) / np.float32(self.scale)
        q = np.rint(np.asarray(x, dtype=np.float32) * inv)
        lo, hi = self.qmin - self.zero_point, self.qmax - self.zero_point
        return (np.clip(q, lo, hi).astype(np.int64) + self.zero_point).astype(np.int32)

    def code(self, r: float) -> int:
        """The code of the real number ``r`` (clipped to the grid)."""
        return int(self.quantize(np.asarray([r]))[0])


def round_half_even_div(num: NDArray[np.int64], den: NDArray[np.int64] | int) -> NDArray[np.int64]:
    """``num / den`` (``den > 0``) rounded to the nearest integer, halves to even, exactly."""
    q, r = np.divmod(num, den)
    twice = 2 * r
    return q + ((twice > den) | ((twice == den) & (q % 2 == 1)))


def rescale(q: NDArray[Any], src: Grid, dst: Grid) -> NDArray[np.int32]:
    """Codes ``q`` on ``src`` moved to ``dst``: ``Z_dst + (S_src / S_dst) (q - Z_src)``, clipped.

    A power-of-two ratio ``2^-k`` (``k >= 1``) is one rounding shift (gemmlowp
    ``RoundingDivideByPOT``, halves away from zero); any other ratio the fixed-point
    multiplier of :func:`lowbit.fixedpoint.requantize`. ``q - Z_src`` saturates to int32.
    """
    if src == dst:
        return q
    centred = np.clip(q.astype(np.int64) - src.zero_point, INT32_MIN, INT32_MAX)
    ratio = src.scale / dst.scale
    mantissa, exponent = math.frexp(ratio)
    if mantissa == 0.5 and exponent <= 0:
        shifted = rounding_divide_by_pot(centred, 1 - exponent) + dst.zero_point
        return np.clip(shifted, dst.qmin, dst.qmax).astype(np.int32)
    m0, shift = quantize_multiplier(ratio)
    return requantize(centred, m0, shift, dst.zero_point, dst.qmin, dst.qmax)


def uint8_offset(lo: int, hi: int, zero_point: int) -> int | None:
    """An offset ``o`` with ``[lo, hi] + o`` and ``zero_point + o`` inside ``[0, 255]``, or None."""
    o = 0 if lo >= 0 else -lo
    inside = lo + o >= 0 and hi + o <= 255 and 0 <= zero_point + o <= 255
    return o if inside else None


def int_pair(node: Node, key: str, default: int) -> tuple[int, int]:
    v = node.attrs.get(key, default)
    v = default if v is None else v
    pair = (v, v) if isinstance(v, int | np.integer) else tuple(v)
    if len(pair) != 2:
        raise GraphError(f"node {node.name!r}: attribute {key!r} must be an int or a pair")
    return int(pair[0]), int(pair[1])


# ----------------------------------------------------------------------------- other ops


def windows(q: NDArray[Any], node: Node, pad_value: int) -> NDArray[Any]:
    """Pooling windows ``[N, C, OH, OW, kh, kw]`` of ``q`` (padded with ``pad_value``)."""
    k = int_pair(node, "kernel_size", 1)
    s = int_pair(node, "stride", 0)
    s = k if s == (0, 0) else s
    p = int_pair(node, "padding", 0)
    if node.attrs.get("ceil_mode") or int_pair(node, "dilation", 1) != (1, 1):
        raise GraphError(f"node {node.name!r}: ceil_mode / dilation pooling is not supported")
    padded = np.pad(q, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(padded, k, axis=(2, 3))
    return win[:, :, :: s[0], :: s[1]]


def avgpool(q: NDArray[Any], node: Node, g: Grid) -> NDArray[Any]:
    """``Z + round_half_even(sum(q - Z) / count)`` over each window."""
    sums = windows(q.astype(np.int64) - g.zero_point, node, 0).sum(axis=(-2, -1))
    count: NDArray[np.int64] | int = math.prod(int_pair(node, "kernel_size", 1))
    if node.attrs.get("count_include_pad") is False:
        ones = np.ones((1, 1, *q.shape[2:]), dtype=np.int64)
        count = windows(ones, node, 0).sum(axis=(-2, -1))
    return round_half_even_div(sums, count) + g.zero_point


def global_avgpool(q: NDArray[Any], g: Grid) -> NDArray[Any]:
    sums = (q.astype(np.int64) - g.zero_point).sum(axis=(2, 3), keepdims=True)
    return round_half_even_div(sums, q.shape[2] * q.shape[3]) + g.zero_point


def clamp_codes(node: Node, g: Grid) -> tuple[int, int]:
    """Code range of ``relu`` / ``clamp(min, max)`` on grid ``g`` (round commutes with clip)."""
    if node.op == "relu":
        return g.zero_point, g.qmax
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return (g.qmin if lo is None else g.code(lo)), (g.qmax if hi is None else g.code(hi))


def pass_op(node: Node, g: Grid) -> Callable[[NDArray[Any]], NDArray[Any]]:
    """The code-domain version of an op that commutes with ``q -> S (q - Z)``."""
    if node.op in ("relu", "clamp"):
        lo, hi = clamp_codes(node, g)
        return lambda q: np.clip(q, lo, hi)
    if node.op == "maxpool2d":
        return lambda q: windows(q, node, np.iinfo(np.int32).min).max(axis=(-2, -1))
    if node.op == "flatten":
        start = int(node.attrs.get("start_dim", 1))
        return lambda q: q.reshape(*q.shape[:start], -1)
    if node.op == "slice":
        a = node.attrs
        index = tuple(slice(*t) for t in zip(a["starts"], a["stops"], a["steps"], strict=True))
        return lambda q: q[index]
    pads = [tuple(int(v) for v in p) for p in node.attrs["pads"]]  # pad
    return lambda q: np.pad(q, pads, constant_values=g.zero_point)


@dataclass
class Op:
    """A non-weighted node: inputs rescaled to ``grid_in``, ``fn`` applied, result to ``grid``."""

    name: str
    inputs: list[str]
    srcs: list[Grid]
    grid_in: Grid
    grid: Grid
    fn: Callable[..., NDArray[Any]]

    def __call__(self, env: Env) -> None:
        pairs = zip(self.inputs, self.srcs, strict=True)
        args = [rescale(env[i], src, self.grid_in) for i, src in pairs]
        out = np.clip(self.fn(*args), self.grid_in.qmin, self.grid_in.qmax).astype(np.int32)
        env[self.name] = rescale(out, self.grid_in, self.grid)


def add_codes(g: Grid) -> Callable[..., NDArray[Any]]:
    """Sum of operands on one grid: ``Z + sum_i (q_i - Z)``, in int64."""
    return lambda *qs: sum(q.astype(np.int64) - g.zero_point for q in qs) + g.zero_point
