"""Validation helpers and the output stages fused into the GEMMs of :mod:`lowbit.runtime.kernels`.

An output stage (:class:`Threshold`, :class:`Scale`, :class:`Requant`) is built once per layer,
validated, and turned into the compiled kernel's parameters (``_params``) or evaluated in numpy
from exact int64 dots (``_finish``, the reference and the fallback without the extension).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..fixedpoint import requantize

__all__ = ["OutputStage", "Requant", "Scale", "Threshold"]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------- validation


def _threads(num_threads: int | None) -> int:
    if num_threads is None:
        return 0
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads}")
    return int(num_threads)


def _matrix(name: str, x: ArrayLike, dtype: type, cols: int | None = None) -> NDArray[Any]:
    """``x`` as a C-contiguous 2-D array of exactly ``dtype`` (no silent casts)."""
    arr = np.asarray(x)
    if arr.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if cols is not None and arr.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _int_scalar(name: str, x: int, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not lo <= x <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {x!r}")
    return int(x)


def _words(k: int) -> int:
    return (k + 63) // 64


# ----------------------------------------------------------------------------- bit rows


def _pack_rows(bits: NDArray[np.bool_]) -> NDArray[np.uint64]:
    """Boolean rows [M, K] as sign words [M, ceil(K/64)] (bit j of word w = column 64 w + j)."""
    m, k = bits.shape
    padded = np.zeros((m, 64 * _words(k)), dtype=bool)
    padded[:, :k] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.uint64)


def _unpack_rows(words: NDArray[np.uint64], k: int) -> NDArray[np.uint8]:
    """Sign words [R, ceil(k/64)] as 0/1 bytes [R, k] (inverse of :func:`_pack_rows`)."""
    as_bytes = np.ascontiguousarray(words).astype("<u8").view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, count=k, bitorder="little")


# ----------------------------------------------------------------------------- output stages


class OutputStage:
    """An output stage fused into a GEMM, validated once and reused across calls.

    Parameters are per channel (length ``N``, one per output column) or per tensor (scalars,
    broadcast to ``N`` on first use and cached). A GEMM without a stage returns int32 dots.
    """

    mode = "int32"

    def __init__(self, **vectors: NDArray[Any]) -> None:
        self._vectors = vectors
        self._cache: dict[int, dict[str, NDArray[Any]]] = {}

    def _columns(self, n: int) -> dict[str, NDArray[Any]]:
        """The parameter vectors for ``n`` output columns (scalars broadcast)."""
        if n not in self._cache:
            cols = {}
            for name, v in self._vectors.items():
                if v.size not in (1, n):
                    raise ValueError(
                        f"{type(self).__name__} {name} has {v.size} values, the GEMM has {n} "
                        "output columns"
                    )
                cols[name] = np.ascontiguousarray(np.broadcast_to(v, (n,)))
            self._cache = {n: cols}
        return self._cache[n]

    def _params(self, n: int) -> tuple:
        """Arguments of the C output stage."""
        return ()

    def _finish(self, dots: NDArray[np.int64]) -> NDArray[Any]:
        """The stage in numpy, from exact int64 dots [M, N]."""
        return dots.astype(np.int32)

    def _alloc(self, m: int, n: int) -> NDArray[Any]:
        return np.empty((m, n), dtype=np.int32)

    def _check(self, dot_bound: int) -> None:
        """Raise if dots of magnitude up to ``dot_bound`` could overflow int32 in this stage."""
        if dot_bound > INT32_MAX:
            raise ValueError(f"dot products up to {dot_bound} do not fit int32: reduce K")


def _real_vector(name: str, x: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf" or arr.ndim > 1:
        raise ValueError(f"{name} must be a real scalar or 1-D array, got {arr.dtype} {arr.shape}")
    return arr.reshape(-1)


class Threshold(OutputStage):
    """BatchNorm + sign fused (BNN inference): packed bits ``(dot >= thr[n]) XOR flip[n]``.

    For ``y = sign(gamma (dot - mu) / sigma + beta)`` let ``tau = mu - beta sigma / gamma``: with
    ``gamma > 0`` pass ``thr = tau``, ``flip = 0`` (bit set iff ``dot >= tau``); with
    ``gamma < 0`` pass ``thr = floor(tau) + 1``, ``flip = 1`` (bit set iff ``dot <= tau``).
    ``thresholds`` real or integer (a real t acts as ceil(t); NaN never fires), ``flip`` 0/1
    (default 0). The GEMM returns uint64 ``[M, ceil(N/64)]`` sign words with zero padding bits:
    the ``a_bits`` input of the next binary layer.
    """

    mode = "threshold"

    def __init__(self, thresholds: ArrayLike, flip: ArrayLike | None = None) -> None:
        thr = _real_vector("thresholds", thresholds)
        if thr.dtype.kind == "f":  # float64: INT32_MAX is exact there, not in float32
            thr = np.ceil(np.where(np.isnan(thr), np.inf, thr.astype(np.float64)))
        thr = np.clip(thr, INT32_MIN, INT32_MAX).astype(np.int32)
        flp = np.asarray(0 if flip is None else flip).reshape(-1)
        if flp.dtype.kind not in "biu" or ((flp != 0) & (flp != 1)).any():
            raise ValueError("flip must hold 0/1 or booleans")
        super().__init__(thr=thr, flip=flp.astype(bool))

    def _params(self, n: int) -> tuple:
        cols = self._columns(n)
        if "flip_words" not in cols:
            cols["flip_words"] = _pack_rows(cols["flip"][None, :])[0]
        return cols["thr"], cols["flip_words"]

    def _finish(self, dots: NDArray[np.int64]) -> NDArray[np.uint64]:
        cols = self._columns(dots.shape[1])
        return _pack_rows((dots >= cols["thr"]) ^ cols["flip"])

    def _alloc(self, m: int, n: int) -> NDArray[np.uint64]:
        return np.empty((m, _words(n)), dtype=np.uint64)


class Scale(OutputStage):
    """``float32(dot) * scale[n] + bias[n]`` (XNOR-Net alpha, folded BatchNorm, dequantisation).

    Computed in float32 with two roundings (no fused multiply-add), so it equals numpy's
    ``dots.astype(float32) * scale + bias`` bit for bit. Returns float32 ``[M, N]``.
    """

    mode = "scale"

    def __init__(self, scale: ArrayLike, bias: ArrayLike | None = None) -> None:
        s = _real_vector("scale", scale).astype(np.float32)
        b = _real_vector("bias", 0.0 if bias is None else bias).astype(np.float32)
        super().__init__(scale=s, bias=b)

    def _params(self, n: int) -> tuple:
        cols = self._columns(n)
        return cols["scale"], cols["bias"]

    def _finish(self, dots: NDArray[np.int64]) -> NDArray[np.float32]:
        cols = self._columns(dots.shape[1])
        return dots.astype(np.float32) * cols["scale"] + cols["bias"]

    def _alloc(self, m: int, n: int) -> NDArray[np.float32]:
        return np.empty((m, n), dtype=np.float32)


class Requant(OutputStage):
    """Integer-only requantisation to uint8 (Jacob et al. 2018; gemmlowp / TFLite semantics).

    ``q = clamp(Zout + M (dot + bias), qmin, qmax)`` with ``M = m0 2^-31 2^-shift``, evaluated as
    ``lowbit.fixedpoint.requantize``: saturating left shift by ``max(-shift, 0)``,
    SaturatingRoundingDoublingHighMul by ``m0``, RoundingDivideByPOT by ``max(shift, 0)``, add
    ``Zout``, clamp (ReLU / ReLU6 are expressed by ``qmin`` / ``qmax``). ``bias``, ``m0`` int32
    and ``shift`` in [-31, 62]: scalars (per tensor) or per channel. Bit-exact; the GEMM refuses
    shapes where ``dot + bias`` could overflow int32.
    """

    mode = "requant"

    def __init__(
        self,
        bias: ArrayLike | None,
        m0: ArrayLike,
        shift: ArrayLike,
        out_zero_point: int,
        qmin: int = 0,
        qmax: int = 255,
    ) -> None:
        b = _int_values("bias", 0 if bias is None else bias, INT32_MIN, INT32_MAX)
        m0v = _int_values("m0", m0, INT32_MIN, INT32_MAX)
        sv = _int_values("shift", shift, -31, 62)
        self.out_zero_point = _int_scalar("out_zero_point", out_zero_point, 0, 255)
        self.qmin = _int_scalar("qmin", qmin, 0, 255)
        self.qmax = _int_scalar("qmax", qmax, self.qmin, 255)
        self._bias_bound = int(np.abs(b).max(initial=0))
        # A right shift of 32 or more sends every high-multiply result (never INT32_MIN) to 0;
        # m0 = 0 with no shift gives exactly that, and keeps the C shifts within [0, 31].
        dead = sv > 31
        super().__init__(
            bias=b.astype(np.int32),
            m0=np.where(dead, 0, m0v).astype(np.int32),
            rshift=np.where(dead, 0, np.maximum(sv, 0)).astype(np.int32),
            lshift=np.maximum(-sv, 0).astype(np.int32),
            m0_raw=m0v,
            shift_raw=sv,
        )

    def _params(self, n: int) -> tuple:
        c, z = self._columns(n), self.out_zero_point
        return c["bias"], c["m0"], c["rshift"], c["lshift"], self.qmin - z, self.qmax - z, z

    def _finish(self, dots: NDArray[np.int64]) -> NDArray[np.uint8]:
        c = self._columns(dots.shape[1])
        acc = dots + c["bias"]
        q = requantize(acc, c["m0_raw"], c["shift_raw"], self.out_zero_point, self.qmin, self.qmax)
        return q.astype(np.uint8)

    def _alloc(self, m: int, n: int) -> NDArray[np.uint8]:
        return np.empty((m, n), dtype=np.uint8)

    def _check(self, dot_bound: int) -> None:
        if dot_bound + self._bias_bound > INT32_MAX:
            raise ValueError(
                f"dot products up to {dot_bound} plus |bias| up to {self._bias_bound} can "
                f"overflow the int32 accumulator (limit {INT32_MAX}): reduce K or the bias"
            )


_INT32_OUTPUT = OutputStage()


def _int_values(name: str, x: ArrayLike, lo: int, hi: int) -> NDArray[np.int64]:
    """Integer scalar or 1-D array as int64, or a ValueError naming a value outside [lo, hi]."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "iu" or arr.ndim > 1:
        raise ValueError(f"{name} must be an integer scalar or 1-D array, got {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    bad = (arr < lo) | (arr > hi)
    if bad.any():
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {arr[bad][0]}")
    return arr
