"""Requantisation epilogues of the integer engine's layers (see :mod:`lowbit.runtime.integer`):
the exact single-rounding 64-bit scheme (the default) and gemmlowp's with headroom."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..contract import GraphError, Node
from ..fixedpoint import INT32_MAX, INT32_MIN, quantize_multiplier, requantize
from .integer_ops import Grid

__all__ = ["INT64_ROOM", "Epilogue", "epilogue", "exact_epilogue", "round_shift_half_even"]

INT64_ROOM = 2**62  # |acc m0| + |bias| stays below this in the exact requantisation


def round_shift_half_even(x: NDArray[np.int64], s: NDArray[np.int64]) -> NDArray[np.int64]:
    """``x / 2^s`` rounded to nearest, ties to even, in exact int64 arithmetic (``s >= 1``)."""
    x, s = np.asarray(x, np.int64), np.asarray(s, np.int64)
    q = x >> s  # floor
    rem = x - (q << s)
    half = np.left_shift(np.int64(1), s - 1)
    return q + ((rem > half) | ((rem == half) & (q & 1 == 1)))


@dataclass(frozen=True)
class Epilogue:
    """What follows a layer's accumulator: requantisation to ``grid``, or (``grid`` None) float.

    ``real = scale * acc + bias`` per output channel (``scale > 0``, BatchNorm folded in). For a
    grid, two schemes (``exact``):

    * exact (the default): ``q = Z + round_half_even((acc m0 + bias_q) 2^-shift)`` in int64,
      with ``m0 2^-shift = scale / S_out`` (``m0 in [2^30, 2^31)``) and ``bias_q =
      round(bias / S_out 2^shift)``; see :func:`exact_epilogue` for its error bound;
    * gemmlowp: ``q = requantize(acc 2^headroom + bias_q, m0, shift)`` with
      ``m0 2^-31 2^-shift = 2^-headroom scale / S_out`` and ``bias_q = round(bias 2^headroom /
      scale)`` (:func:`lowbit.fixedpoint.requantize`, double rounding).
    """

    scale: NDArray[np.float64]
    bias: NDArray[np.float64]
    grid: Grid | None
    headroom: int = 0
    m0: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    shift: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    bias_q: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    exact: bool = True

    def requantize(self, acc: NDArray[np.int64], sl: slice) -> NDArray[np.int32]:
        """Codes from int64 accumulators ``[M, N]`` of output channels ``sl`` (int32-saturated)."""
        g = self.grid
        if self.exact:
            acc = np.clip(acc, INT32_MIN, INT32_MAX)
            q = round_shift_half_even(acc * self.m0[sl] + self.bias_q[sl], self.shift[sl])
            return np.clip(q + g.zero_point, g.qmin, g.qmax).astype(np.int32)
        scaled = np.clip(acc * 2**self.headroom + self.bias_q[sl], INT32_MIN, INT32_MAX)
        return requantize(scaled, self.m0[sl], self.shift[sl], g.zero_point, g.qmin, g.qmax)


def multipliers(node: Node, ratio: NDArray[np.float64]) -> tuple[NDArray[np.int64], ...]:
    try:
        pairs = [quantize_multiplier(float(r)) for r in ratio]
    except ValueError as exc:
        raise GraphError(f"node {node.name!r}: cannot requantise: {exc}") from exc
    m0, shift = (np.array(v, dtype=np.int64) for v in zip(*pairs, strict=True))
    return m0, shift


def exact_epilogue(
    node: Node, scale: NDArray[np.float64], bias: NDArray[np.float64], grid: Grid, acc_bound: int
) -> Epilogue:
    """Single-rounding requantisation in 64 bits, exact up to a bound (the default scheme).

    Per channel ``M = scale / S_out = m0 2^-31 2^-n`` (:func:`~lowbit.fixedpoint.
    quantize_multiplier`), total shift ``s = 31 + n`` and ``bias_q = round(bias / S_out 2^s)``;
    the output is ``Z + round_half_even((acc m0 + bias_q) 2^-s)``, clamped. ``acc`` is the int32
    accumulator, ``acc m0 + bias_q`` an int64 (when ``acc_bound m0 + |bias_q|`` could reach
    ``2^62``, or ``s > 62``, ``m0`` and ``s`` lose the same number of low bits, which for
    ``s > 62`` costs less than ``acc_bound 2^-62`` of a code). Against the real value
    ``v = M_f acc + bias / S_out`` (``M_f`` the float64 ratio) the rounded quantity is off by at
    most ``|M_f acc| 2^-31 + 2^-s`` (``m0``'s rounding, then ``bias_q``'s) plus float64's
    ``2^-52`` relative error of ``bias / S_out``: for outputs within a few hundred codes that is
    below ``2^-21`` of a code, so the code equals ``round_half_even(v)`` unless ``v`` lies that
    close to a half-integer -- closer than the float32 fake-quant model computes ``v`` itself.
    A C kernel implements it with int32 accumulators, a 32x32->64-bit multiply per output, one
    64-bit add and a rounding right shift (TFLite's single-rounding
    ``MultiplyByQuantizedMultiplier`` with the bias folded in below the binary point, and ties to
    even as ``torch.round``).
    """
    m0, n = multipliers(node, scale / grid.scale)
    shift = 31 + n
    offset = bias / grid.scale
    acc_bound = min(acc_bound, INT32_MAX)
    while True:
        bias_q = np.rint(offset * np.exp2(shift.astype(np.float64)))
        over = (acc_bound * m0.astype(np.float64) + np.abs(bias_q) >= INT64_ROOM) | (shift > 62)
        if not over.any():
            break
        if shift[over].min() <= 1:
            raise GraphError(f"node {node.name!r}: cannot requantise within 64 bits")
        m0 = np.where(over, (m0 + 1) >> 1, m0)
        shift = np.where(over, shift - 1, shift)
    return Epilogue(scale, bias, grid, 0, m0, shift, bias_q.astype(np.int64))


def epilogue(
    node: Node,
    scale: NDArray[np.float64],
    bias: NDArray[np.float64],
    grid: Grid | None,
    acc_bound: int,
    min_shift: int | None,
) -> Epilogue:
    """Multipliers, headroom and quantised bias of a layer; ``acc_bound`` bounds ``|acc|``.

    ``min_shift`` None: :func:`exact_epilogue`. Otherwise gemmlowp with headroom: when the
    smallest requantisation shift ``n`` is below ``min_shift``, the accumulator is multiplied by
    ``2^L`` (exact in int32, ``L <= min_shift - n``, limited by ``acc_bound``) and the shift
    raised by ``L``, so the double rounding of the high multiply and the shift lands
    ``min_shift`` bits below the output's unit (rate ``2^-(n+L+1)`` instead of ``2^-(n+1)``) and
    the bias is kept to ``2^-L`` of an accumulator unit.
    """
    if grid is None:
        return Epilogue(scale, bias, None)
    if min_shift is None:
        return exact_epilogue(node, scale, bias, grid, acc_bound)
    m0, shift = multipliers(node, scale / grid.scale)
    bias_bound = int(np.abs(np.rint(bias / scale)).max(initial=0)) + 1
    room = math.floor(math.log2(INT32_MAX / (acc_bound + bias_bound)))
    if room < 0:
        raise GraphError(f"node {node.name!r}: accumulator and bias may overflow int32")
    headroom = max(0, min(min_shift - int(shift.min()), room))
    bias_q = np.rint(bias * 2.0**headroom / scale).astype(np.int64)
    return Epilogue(scale, bias, grid, headroom, m0, shift + headroom, bias_q, exact=False)
