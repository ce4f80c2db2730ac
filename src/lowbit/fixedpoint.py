"""Integer-only requantisation (Jacob et al. 2018, Sec. 2.2; gemmlowp fixed-point semantics).

An integer layer computes an int32 accumulator ``acc = sum_j (q1_j - Z1)(q2_j - Z2)`` and must
produce ``q3 = Z3 + M * acc`` with the real multiplier ``M = S1 S2 / S3``. ``M`` is represented as

    M = M0 * 2^-31 * 2^-n,     M0 an int32 in [2^30, 2^31)  (a Q31 number in [0.5, 1)),

and ``M * acc`` is evaluated with two integer primitives: a saturating rounding doubling high
multiply by ``M0`` and a rounding right shift by ``n``. Everything here is numpy-only so the
runtime can use it as its reference without torch. Arrays broadcast with numpy rules, so
per-channel ``M0``/``n`` vectors work as long as they are shaped to broadcast against ``acc``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
MAX_RIGHT_SHIFT = 62  # largest shift int64 arithmetic supports; shifts >= 32 already round to 0/-1
MAX_LEFT_SHIFT = 31  # keeps |acc| * 2^left inside int64 before saturation


def _int64_in_range(name: str, x: ArrayLike, lo: int, hi: int) -> NDArray[np.int64]:
    """``x`` as an int64 array, or a ValueError naming ``name`` if a value lies outside [lo, hi]."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < lo or arr.max() > hi):
        bad = arr[(arr < lo) | (arr > hi)].flat[0]
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {bad}")
    return arr


def quantize_multiplier(m: float) -> tuple[int, int]:
    """Split a real multiplier into ``(M0, n)`` with ``m ~= M0 * 2^-31 * 2^-n`` (Jacob Eq. 6).

    ``m = q * 2^e`` with ``q in [0.5, 1)`` (``frexp``); ``M0 = round(q * 2^31)`` lies in
    ``[2^30, 2^31)`` (when rounding reaches ``2^31``, ``M0`` is halved and ``e`` raised by one)
    and ``n = -e``. The relative error ``|M0 2^-31 2^-n - m| / m`` is at most ``2^-31``.

    For the usual ``m in (0, 1)``, ``n >= 0`` is a right shift. For ``m >= 1`` (possible when the
    output scale is smaller than the product of the input scales) ``n`` is negative and
    :func:`requantize` shifts the accumulator left by ``-n`` first, saturating to int32 (as
    TFLite's ``MultiplyByQuantizedMultiplier`` does, minus its undefined overflow).

    Raises ValueError unless ``m`` is finite and positive with ``n`` in ``[-31, 62]`` (roughly
    ``2^-62 <= m < 2^31``).
    """
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"multiplier m must be finite and positive, got {m}")
    q, e = math.frexp(m)
    m0 = round(q * 2**31)
    if m0 == 2**31:
        m0, e = 2**30, e + 1
    if not -MAX_LEFT_SHIFT <= -e <= MAX_RIGHT_SHIFT:
        raise ValueError(f"multiplier m={m} needs shift {-e}, outside [-31, 62]")
    return m0, -e


def saturating_rounding_doubling_high_mul(a: ArrayLike, b: ArrayLike) -> NDArray[np.int32]:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: the high 32 bits of ``2 a b``, rounded.

    Returns ``(a b + nudge) / 2^31`` with C truncating division and ``nudge = 2^30`` when
    ``a b >= 0`` else ``1 - 2^30``; this equals ``floor(a b / 2^31 + 1/2)``, i.e. ``a b / 2^31``
    rounded to nearest with halves rounded up (towards +inf). The only overflow,
    ``a = b = INT32_MIN``, saturates to ``INT32_MAX``. Inputs must be int32-valued.
    """
    a64 = _int64_in_range("a", a, INT32_MIN, INT32_MAX)
    b64 = _int64_in_range("b", b, INT32_MIN, INT32_MAX)
    ab = a64 * b64
    v = ab + np.where(ab >= 0, 2**30, 1 - 2**30)
    high = np.where(v >= 0, v >> 31, -((-v) >> 31))
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    return np.where(overflow, INT32_MAX, high).astype(np.int32)


def rounding_divide_by_pot(x: ArrayLike, exponent: ArrayLike) -> NDArray[np.int64]:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded, halves away from zero.

    ``(x >> e) + (remainder > threshold)`` with ``remainder = x & (2^e - 1)`` and
    ``threshold = (2^e - 1) >> 1`` plus one for negative ``x``. ``exponent`` in ``[0, 62]``.
    """
    x64 = _int64_in_range("x", x, -(2**62), 2**62)
    e = _int64_in_range("exponent", exponent, 0, MAX_RIGHT_SHIFT)
    mask = np.left_shift(np.int64(1), e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return (x64 >> e) + (remainder > threshold)


def requantize(
    acc_int32: ArrayLike,
    m0: ArrayLike,
    shift: ArrayLike,
    zero_point: ArrayLike,
    qmin: int,
    qmax: int,
) -> NDArray[np.int32]:
    """Integer requantisation ``clamp(Z3 + M acc, qmin, qmax)`` with ``M = M0 2^-31 2^-shift``.

    Steps (gemmlowp/TFLite): left shift by ``max(-shift, 0)`` saturating to int32, then
    :func:`saturating_rounding_doubling_high_mul` by ``m0``, :func:`rounding_divide_by_pot` by
    ``max(shift, 0)``, add ``zero_point``, clamp (the clamp also applies a fused ReLU/ReLU6 when
    ``qmin``/``qmax`` are set to the quantised 0 / 6).

    Against the float reference ``clamp(round_half_even(m acc) + Z)`` the result differs by at
    most one. The main cause is double rounding: the high multiply rounds ``acc M0 2^-31`` to an
    integer ``y`` first, and when ``y / 2^n`` then lands exactly on a half (``y mod 2^n =
    2^(n-1)``, probability ``2^-n``) the shift rounds it away from zero while the exact product
    lay on the other side half of the time. For accumulators spread over many multiples of
    ``2^n`` the off-by-one rate is therefore about ``2^-(n+1)`` (0.1% at ``n = 9``, i.e.
    ``m ~ 1e-3``; 25% at ``n = 1``). Smaller causes: exact ties round half up (``n <= 0``) or
    half away from zero (``n > 0``) rather than to even, and ``M0`` approximates ``m`` to
    ``2^-31`` relative. ``tests/test_quant_affine.py`` measures the rate.
    """
    if qmin > qmax:
        raise ValueError(f"qmin {qmin} > qmax {qmax}")
    acc = _int64_in_range("acc_int32", acc_int32, INT32_MIN, INT32_MAX)
    n = _int64_in_range("shift", shift, -MAX_LEFT_SHIFT, MAX_RIGHT_SHIFT)
    shifted = np.clip(acc << np.maximum(-n, 0), INT32_MIN, INT32_MAX)
    scaled = rounding_divide_by_pot(
        saturating_rounding_doubling_high_mul(shifted, m0), np.maximum(n, 0)
    )
    out = scaled + _int64_in_range("zero_point", zero_point, INT32_MIN, INT32_MAX)
    return np.clip(out, qmin, qmax).astype(np.int32)
