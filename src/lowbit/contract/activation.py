"""How a layer quantises its input at run time: the :class:`InputQuant` kinds (numpy, no torch).

An activation quantiser's :meth:`~lowbit.quant.Quantizer.runtime_spec` returns one of these (or
None where its evaluation forward passes the input through); the exporters store it and both
engines apply it. Each kind's :meth:`~InputQuant.fake_quantize` is the reference float32
semantics, equal to the torch quantiser's evaluation forward bit for bit:

* :class:`StaticQuant` -- a fixed uniform/affine grid (LSQ, PACT, DoReFa, affine/Jacob):
  ``codes = clip(round_half_even(x * inv_scale) + zp, qmin, qmax)``; ``inv_scale`` is the
  float32 multiplier the quantiser itself applies (``n / alpha`` for PACT), ``1 / scale`` when
  None;
* :class:`SignQuant` -- ``+1`` where ``x >= 0`` else ``-1``, scale 1 (BNN);
* :class:`SignMeanAbsQuant` -- XNOR-Net: sign codes times ``beta = mean|x|`` over the channel
  dim (or over all non-batch dims per sample);
* :class:`DynamicMaxAbsQuant` -- a symmetric grid with scale ``max|x| / qmax`` over the whole
  batch, computed per call (stochastic rounding's evaluation path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from .base import F32, GraphError, Record, TensorGet, TensorPut, inline_get, inline_put, is_int
from .spec import MAX_CODE, CodeSpec

__all__ = [
    "INPUT_QUANTS",
    "DynamicMaxAbsQuant",
    "InputQuant",
    "SignMeanAbsQuant",
    "SignQuant",
    "StaticQuant",
    "mean_abs",
    "signs",
]


def signs(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """``sign(x)`` with ``sign(0) = +1`` as float32 ``{-1, +1}``."""
    return np.where(x >= 0, F32(1), F32(-1))


def mean_abs(x: NDArray[np.float32], per_sample: bool) -> NDArray[np.float32]:
    """XNOR-Net ``beta = mean|x|`` over the channel dim (or all non-batch dims), keepdims."""
    dims = tuple(range(1, x.ndim)) if per_sample else (1,)
    return np.abs(x).mean(axis=dims, keepdims=True, dtype=F32)


class InputQuant(Record):
    """Base of the input quantiser kinds; ``kind`` is the name stored in files."""

    kind: ClassVar[str] = ""

    def fake_quantize(self, x: NDArray[np.float32]) -> NDArray[np.float32]:  # pragma: no cover
        raise NotImplementedError

    def fields_json(self, put: TensorPut, prefix: str) -> dict[str, Any]:
        return {}

    def to_json(self, put: TensorPut = inline_put, prefix: str = "input_quant") -> dict[str, Any]:
        """``{"kind": ..., fields}``; ``put`` stores arrays (default: inline)."""
        return {"kind": self.kind, **self.fields_json(put, prefix)}

    @staticmethod
    def from_json(
        d: Any, get: TensorGet = inline_get, where: str = "input_quant"
    ) -> InputQuant | None:
        """The input quantiser of a JSON object (None for null); GraphError naming ``where``."""
        if d is None:
            return None
        kind = d.get("kind") if isinstance(d, dict) else None
        cls = INPUT_QUANTS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise GraphError(
                f"{where}: unknown input_quant {d!r:.80}; kinds: {', '.join(INPUT_QUANTS)}"
            )
        unknown = sorted(set(d) - {"kind", *cls.__dataclass_fields__})  # type: ignore[attr-defined]
        if unknown:
            raise GraphError(f"{where} has unknown key {unknown[0]!r:.40}")
        try:
            return cls.parse(d, get, where)  # type: ignore[attr-defined,no-any-return]
        except GraphError as err:
            raise GraphError(f"{where}: {err}") from None


@dataclass(frozen=True, eq=False)
class StaticQuant(InputQuant):
    """A fixed per-tensor uniform/affine grid (see the module docstring)."""

    kind: ClassVar[str] = "static"
    spec: CodeSpec
    inv_scale: float | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if not isinstance(spec, CodeSpec):
            raise GraphError(f"a static input_quant needs a CodeSpec, got {type(spec).__name__}")
        if not spec.uniform_grid or spec.scale.size != 1:
            raise GraphError("a static input_quant needs a per-tensor uniform/affine spec")
        inv = self.inv_scale
        if inv is not None:
            real = isinstance(inv, (int, float, np.floating)) and not isinstance(inv, bool)
            if not (real and np.isfinite(inv) and inv > 0):
                raise GraphError(f"inv_scale must be a positive finite number, got {inv!r:.40}")
            object.__setattr__(self, "inv_scale", float(F32(inv)))

    @property
    def scale(self) -> np.float32:
        return F32(self.spec.scale.reshape(()))

    @property
    def inv(self) -> np.float32:
        """The float32 multiplier applied before rounding."""
        return F32(1) / self.scale if self.inv_scale is None else F32(self.inv_scale)

    @property
    def zero_point(self) -> np.float32:
        zp = self.spec.zero_point
        return F32(0) if zp is None else F32(zp.reshape(()))

    def codes(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        """``clip(round_half_even(x * inv) + zp, qmin, qmax)`` (float32, integer-valued)."""
        c = np.rint(x * self.inv)
        zp = self.zero_point
        if zp != 0:
            c += zp
        return np.clip(c, F32(self.spec.qmin), F32(self.spec.qmax))

    def fake_quantize(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        c, zp = self.codes(x), self.zero_point
        return (c - zp) * self.scale if zp != 0 else c * self.scale

    def fields_json(self, put: TensorPut, prefix: str) -> dict[str, Any]:
        inv = None if self.inv_scale is None else np.asarray(self.inv_scale, F32)
        return {
            "spec": self.spec.to_json(put, f"{prefix}.spec"),
            "inv_scale": None if inv is None else put(f"{prefix}.inv_scale", inv, None),
        }

    @classmethod
    def parse(cls, d: dict[str, Any], get: TensorGet, where: str) -> StaticQuant:
        spec = CodeSpec.from_json(d.get("spec"), get, f"{where}.spec")
        inv = d.get("inv_scale")
        if inv is not None:
            arr = get(inv, f"{where}.inv_scale", False)
            if arr.size != 1:
                raise GraphError(f"{where}.inv_scale must be one number")
            inv = float(arr.reshape(()))
        return cls(spec, inv)


@dataclass(frozen=True, eq=False)
class SignQuant(InputQuant):
    """BNN: ``+1`` where ``x >= 0`` else ``-1``."""

    kind: ClassVar[str] = "sign"

    def fake_quantize(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return signs(x)

    @classmethod
    def parse(cls, d: dict[str, Any], get: TensorGet, where: str) -> SignQuant:
        return cls()


@dataclass(frozen=True, eq=False)
class SignMeanAbsQuant(InputQuant):
    """XNOR-Net: ``mean|x| sign(x)``, the mean over the channel dim or (``per_sample``) over
    every non-batch dim."""

    kind: ClassVar[str] = "sign_mean_abs"
    per_sample: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.per_sample, bool):
            raise GraphError(f"sign_mean_abs per_sample must be a bool, got {self.per_sample!r}")

    def fake_quantize(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return mean_abs(x, self.per_sample) * signs(x)

    def fields_json(self, put: TensorPut, prefix: str) -> dict[str, Any]:
        return {"per_sample": self.per_sample}

    @classmethod
    def parse(cls, d: dict[str, Any], get: TensorGet, where: str) -> SignMeanAbsQuant:
        return cls(d.get("per_sample", False))


@dataclass(frozen=True, eq=False)
class DynamicMaxAbsQuant(InputQuant):
    """Symmetric grid ``[-qmax, qmax]`` with scale ``max|x| / qmax`` over the batch."""

    kind: ClassVar[str] = "dynamic_max_abs"
    qmax: int = 127

    def __post_init__(self) -> None:
        if not (is_int(self.qmax) and 1 <= self.qmax <= MAX_CODE):
            raise GraphError(f"dynamic_max_abs qmax must be in [1, 2^24], got {self.qmax!r:.40}")
        object.__setattr__(self, "qmax", int(self.qmax))

    def scale(self, x: NDArray[np.float32]) -> np.float32:
        """``max|x| / qmax`` over the whole batch (at least the smallest normal float32)."""
        amax = F32(np.abs(x).max(initial=0.0))
        return max(amax / F32(self.qmax), np.finfo(F32).tiny)

    def fake_quantize(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        s = self.scale(x)
        return np.clip(np.rint(x * (F32(1) / s)), -self.qmax, self.qmax) * s

    def fields_json(self, put: TensorPut, prefix: str) -> dict[str, Any]:
        return {"qmax": self.qmax}

    @classmethod
    def parse(cls, d: dict[str, Any], get: TensorGet, where: str) -> DynamicMaxAbsQuant:
        return cls(d.get("qmax"))  # type: ignore[arg-type]


INPUT_QUANTS: dict[str, type[InputQuant]] = {
    c.kind: c for c in (StaticQuant, SignQuant, SignMeanAbsQuant, DynamicMaxAbsQuant)
}
