"""How integer codes map back to real values: :class:`CodeSpec` (numpy, no torch).

A weight quantiser's :meth:`~lowbit.quant.Quantizer.codes` gives integer codes and a spec (its
torch view, :class:`lowbit.quant.QuantSpec`, converts to and from this class in one place);
``CodeSpec.dequantize(codes)`` reproduces the fake-quant values bit for bit. Schemes (``c`` a
code, ``s`` the scale broadcast along ``axis``):

* ``binary``  -- ``c in {-1, +1}``, real ``s c``;
* ``ternary`` -- ``c in {-1, 0, +1}``, real ``s c`` for ``c >= 0`` and ``scale_neg c`` for
  ``c < 0`` (TTQ's ``Wp``/``Wn``; symmetric when ``scale_neg`` is None);
* ``uniform`` -- ``c in [qmin, qmax]``, real ``s (c - zero_point)``; the zero point may be a
  non-integer (DoReFa's offset grid) or None for 0;
* ``affine``  -- as ``uniform`` with an integer zero point (Jacob et al.);
* ``pow2``    -- ``c in [-qmax, qmax]``, real ``sign(c) s 2^(|c| - qmax)`` (0 for ``c = 0``).

Scales are finite float32 numbers, positive; binary and ternary scales may also be 0 (XNOR-Net's
``alpha = mean|W_c|`` of an output channel whose weights are all zero).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .base import (
    F32,
    GraphError,
    Record,
    TensorGet,
    TensorPut,
    frozen_array,
    inline_get,
    inline_put,
    is_int,
)

__all__ = ["MAX_CODE", "SCHEMES", "SPEC_KEYS", "SPEC_TENSORS", "UNIFORM_SCHEMES", "CodeSpec"]

SCHEMES: tuple[str, ...] = ("binary", "ternary", "uniform", "affine", "pow2")
UNIFORM_SCHEMES = ("uniform", "affine")
MAX_CODE = 2**24
"""Largest ``|qmin|``, ``|qmax|`` accepted (codes are exact in float32 up to 2^24)."""
SPEC_TENSORS = ("scale", "zero_point", "scale_neg")
"""Spec fields that hold numbers (stored as float32 tensors in a ``.lowbit`` file)."""
SPEC_KEYS = ("scheme", "bits", "qmin", "qmax", "axis", "signed", *SPEC_TENSORS)


def _channel(t: NDArray[np.float32], ndim: int, axis: int | None) -> NDArray[np.float32]:
    """Reshape a per-channel vector to broadcast along ``axis`` of an ``ndim`` array."""
    if axis is None or t.size == 1:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = t.size
    return t.reshape(shape)


@dataclass(frozen=True, eq=False)
class CodeSpec(Record):
    """How integer codes map back to real values (see the module docstring).

    ``scale``, ``zero_point`` and ``scale_neg`` are read-only float32 arrays, each one number
    (shape ``()`` or ``(1,)``) or one per channel along ``axis``. Construction checks every
    field (GraphError); :meth:`check_codes` checks codes against the spec.
    """

    scheme: str
    bits: int
    qmin: int
    qmax: int
    scale: NDArray[np.float32]
    zero_point: NDArray[np.float32] | None = None
    scale_neg: NDArray[np.float32] | None = None
    axis: int | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise GraphError(f"unknown scheme {self.scheme!r:.40}; known: {', '.join(SCHEMES)}")
        if not (is_int(self.bits) and 1 <= self.bits <= 32):
            raise GraphError(f"bits must be an int in [1, 32], got {self.bits!r:.40}")
        lo, hi = self.qmin, self.qmax
        if not (is_int(lo) and is_int(hi) and -MAX_CODE <= lo <= hi <= MAX_CODE):
            raise GraphError(f"bad qmin/qmax {lo!r:.40}, {hi!r:.40}")
        if not isinstance(self.signed, bool):
            raise GraphError(f"signed must be a bool, got {self.signed!r:.40}")
        if self.axis is not None and not (is_int(self.axis) and 0 <= self.axis < 8):
            raise GraphError(f"axis must be None or a dim index, got {self.axis!r:.40}")
        for key in SPEC_TENSORS:
            value = getattr(self, key)
            if value is None:
                continue
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiu" or arr.ndim > 1:
                raise GraphError(
                    f"{key} must be a number or a vector, got shape {list(arr.shape)} ({arr.dtype})"
                )
            if self.axis is None and arr.size == 1:  # per tensor: one shape, () (files hold [1])
                arr = arr.reshape(())
            object.__setattr__(self, key, frozen_array(arr))
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "qmin", int(self.qmin))
        object.__setattr__(self, "qmax", int(self.qmax))
        if self.axis is not None:
            object.__setattr__(self, "axis", int(self.axis))
        self._check_values()

    def _check_values(self) -> None:
        if self.scale is None:
            raise GraphError("a spec needs a scale")
        for key in SPEC_TENSORS:
            arr = getattr(self, key)
            if arr is not None and not np.all(np.isfinite(arr)):
                raise GraphError(f"{key} must be finite")
        sizes = {a.size for a in (self.scale, self.zero_point, self.scale_neg) if a is not None}
        if len(sizes - {1}) > 1 or 0 in sizes:
            raise GraphError(f"scale, zero_point and scale_neg sizes {sorted(sizes)} disagree")
        if self.axis is None and sizes != {1}:
            raise GraphError("per-channel values need an axis")
        zero_ok = self.scheme in ("binary", "ternary")
        for key in ("scale", "scale_neg"):
            arr = getattr(self, key)
            if arr is not None and not (np.all(arr >= 0) if zero_ok else np.all(arr > 0)):
                what = "negative" if zero_ok else "zero or negative"
                raise GraphError(f"{self.scheme} {key} must not be {what}, got {arr.min()}")
        if self.scale_neg is not None and self.scheme != "ternary":
            raise GraphError("scale_neg is only for ternary weights")
        if self.zero_point is not None:
            if self.scheme not in UNIFORM_SCHEMES:
                raise GraphError(f"a {self.scheme} spec has no zero point")
            if self.scheme == "affine" and not np.all(self.zero_point == np.round(self.zero_point)):
                raise GraphError(
                    f"affine zero point must be an integer, got {self.zero_point.reshape(-1)[0]}"
                )

    @property
    def uniform_grid(self) -> bool:
        """A ``uniform`` or ``affine`` spec: real ``s (c - zero_point)``."""
        return self.scheme in UNIFORM_SCHEMES

    @property
    def per_channel(self) -> bool:
        return self.axis is not None and self.scale.size > 1

    @property
    def code_range(self) -> tuple[int, int]:
        """The codes the scheme allows: ``[-1, 1]`` for binary/ternary, else ``[qmin, qmax]``,
        intersected with ``[qmin, qmax]``."""
        lo, hi = (-1, 1) if self.scheme in ("binary", "ternary") else (self.qmin, self.qmax)
        if self.scheme == "pow2":
            lo = -self.qmax
        return max(lo, self.qmin), min(hi, self.qmax)

    def check_codes(self, codes: NDArray[Any]) -> None:
        """GraphError unless ``codes`` are integers the scheme allows, with ``axis`` indexing
        them and per-channel values one per channel."""
        codes = np.asarray(codes)
        if codes.dtype.kind not in "iu":
            raise GraphError(f"weight codes must be integers, got {codes.dtype}")
        if self.axis is not None and self.axis >= codes.ndim:
            raise GraphError(f"axis {self.axis} does not index the weight of shape {codes.shape}")
        n = 1 if self.axis is None else codes.shape[self.axis]
        for key in SPEC_TENSORS:
            arr = getattr(self, key)
            if arr is not None and arr.size not in (1, n):
                raise GraphError(f"{key} must be a number or a vector of {n}, got {arr.size}")
        lo, hi = self.code_range
        bad = (codes < lo) | (codes > hi)
        if self.scheme == "binary":
            bad |= codes == 0
        if bad.any():
            raise GraphError(
                f"weight code {int(codes[bad].reshape(-1)[0])} is outside the {self.scheme} "
                f"spec [{self.qmin}, {self.qmax}]"
            )

    def dequantize(self, codes: NDArray[Any]) -> NDArray[np.float32]:
        """Real values of integer ``codes`` (float32; the torch formulas, so bit for bit)."""
        c = np.asarray(codes).astype(F32)
        nd = c.ndim
        s = _channel(self.scale, nd, self.axis)
        if self.scheme == "binary":
            return s * c
        if self.scheme == "ternary":
            neg = s if self.scale_neg is None else _channel(self.scale_neg, nd, self.axis)
            return np.where(c >= 0, s * c, neg * c).astype(F32)
        if self.scheme in UNIFORM_SCHEMES:
            if self.zero_point is None:
                return s * c
            return s * (c - _channel(self.zero_point, nd, self.axis))
        mag = s * np.exp2(np.abs(c) - F32(self.qmax))
        return np.where(c == 0, F32(0), np.sign(c) * mag).astype(F32)

    def integer_zero_point(self) -> NDArray[np.int64] | None:
        """The zero point as integers in the scale's shape (0 when None), or None if fractional
        (uniform/affine specs only)."""
        zp = np.zeros(self.scale.shape) if self.zero_point is None else self.zero_point
        zp = np.broadcast_to(np.asarray(zp, np.float64).reshape(-1), (self.scale.size,))
        zp = zp.reshape(self.scale.shape)
        return zp.astype(np.int64) if np.all(zp == np.round(zp)) else None

    # -- JSON ------------------------------------------------------------------------------------
    def to_json(self, put: TensorPut = inline_put, prefix: str = "spec") -> dict[str, Any]:
        """The spec as a JSON object; ``put`` stores each number field (default: inline)."""
        out: dict[str, Any] = {
            "scheme": self.scheme,
            "bits": self.bits,
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
            "signed": self.signed,
        }
        for key in SPEC_TENSORS:
            arr = getattr(self, key)
            out[key] = None if arr is None else put(f"{prefix}.{key}", arr, None)
        return out

    @classmethod
    def from_json(cls, d: Any, get: TensorGet = inline_get, where: str = "spec") -> CodeSpec:
        """The spec of a JSON object (:meth:`to_json`); GraphError naming ``where``."""
        if not isinstance(d, dict):
            raise GraphError(f"{where} must be a JSON object")
        unknown = sorted(set(d) - set(SPEC_KEYS))
        if unknown:
            raise GraphError(f"{where} has unknown key {unknown[0]!r:.40}")
        for key in ("scheme", "bits", "qmin", "qmax", "axis", "signed", "scale"):
            if key not in d:
                raise GraphError(f"{where} has no {key!r}")
        arrays = {
            k: None if d.get(k) is None else get(d[k], f"{where}.{k}", False) for k in SPEC_TENSORS
        }
        if arrays["scale"] is None:
            raise GraphError(f"{where} has no scale")
        try:
            return cls(
                d["scheme"],
                d["bits"],
                d["qmin"],
                d["qmax"],
                axis=d["axis"],
                signed=d["signed"],
                **arrays,  # type: ignore[arg-type]
            )
        except GraphError as err:
            raise GraphError(f"{where}: {err}") from None
