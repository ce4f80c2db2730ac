"""The quantiser contract shared by every method.

Every quantiser is a small :class:`torch.nn.Module` that

* fake-quantises in ``forward``: the output is a float tensor whose values lie on the method's
  level set, with the method's gradient rule (METHODS.md) in backward;
* states what it means in integers through :meth:`Quantizer.codes`, which returns the integer
  codes and a :class:`QuantSpec`. ``spec.dequantize(codes)`` reproduces ``forward`` exactly, so
  export and runtime never re-derive a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ..contract import SCHEMES, CodeSpec, InputQuant

Role = Literal["weight", "activation"]


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in forward; multiplies the gradient reaching ``x`` by ``factor`` (LSQ Eq. 4)."""
    scaled = x * factor
    return scaled + (x - scaled).detach()


def channel_view(t: Tensor, ndim: int, axis: int | None) -> Tensor:
    """Reshape a per-channel vector so that it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = t.numel()
    return t.reshape(shape)


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """How integer codes map back to real values: the torch view of the deployment contract's
    :class:`lowbit.contract.CodeSpec` (:meth:`to_contract` / :meth:`from_contract` convert).

    Schemes (``c`` is a code, ``s`` the scale broadcast along ``axis``):

    * ``binary``  -- ``c in {-1, +1}``, real ``s * c``.
    * ``ternary`` -- ``c in {-1, 0, +1}``, real ``s * c`` for ``c >= 0`` and
      ``scale_neg * c`` for ``c < 0`` (TTQ's asymmetric ``Wp``/``Wn``; symmetric when
      ``scale_neg`` is None).
    * ``uniform`` -- ``c in [qmin, qmax]``, real ``s * (c - zero_point)``; ``zero_point`` may be a
      non-integer float (DoReFa's offset grid) or None for 0.
    * ``affine``  -- as ``uniform`` with an integer ``zero_point`` (Jacob et al.); such a layer can
      run on the integer-only engine.
    * ``pow2``    -- ``c in [-(qmax), qmax]``, real ``sign(c) * s * 2**(|c| - qmax)`` and 0 for
      ``c = 0``: ``s`` is the largest level, ``qmax`` the number of exponents.
    """

    scheme: str
    bits: int
    qmin: int
    qmax: int
    scale: Tensor
    zero_point: Tensor | None = None
    scale_neg: Tensor | None = None
    axis: int | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantisation scheme {self.scheme!r}; known: {SCHEMES}")
        if not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be in [1, 32], got {self.bits}")
        if self.qmin > self.qmax:
            raise ValueError(f"qmin {self.qmin} > qmax {self.qmax}")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None and self.scale.dim() > 0

    def dequantize(self, codes: Tensor) -> Tensor:
        """Map integer ``codes`` back to the real values the fake-quant forward produced."""
        nd = codes.dim()
        s = channel_view(self.scale, nd, self.axis)
        c = codes.to(s.dtype)
        if self.scheme == "binary":
            return s * c
        if self.scheme == "ternary":
            neg = s if self.scale_neg is None else channel_view(self.scale_neg, nd, self.axis)
            return torch.where(c >= 0, s * c, neg * c)
        if self.scheme in ("uniform", "affine"):
            if self.zero_point is None:
                return s * c
            return s * (c - channel_view(self.zero_point, nd, self.axis).to(s.dtype))
        # pow2
        mag = s * torch.exp2(c.abs() - self.qmax)
        return torch.where(c == 0, torch.zeros_like(mag), torch.sign(c) * mag)

    def to_contract(self) -> CodeSpec:
        """The deployment contract's :class:`~lowbit.contract.CodeSpec` (float32 numpy values);
        GraphError (a ValueError) for values the contract refuses, e.g. a zero scale."""

        def arr(t: Tensor | None) -> object:
            return None if t is None else t.detach().to("cpu", torch.float32).numpy()

        return CodeSpec(
            self.scheme,
            self.bits,
            self.qmin,
            self.qmax,
            scale=arr(self.scale),  # type: ignore[arg-type]
            zero_point=arr(self.zero_point),  # type: ignore[arg-type]
            scale_neg=arr(self.scale_neg),  # type: ignore[arg-type]
            axis=self.axis,
            signed=self.signed,
        )

    @classmethod
    def from_contract(cls, spec: CodeSpec) -> QuantSpec:
        """The torch view of a contract :class:`~lowbit.contract.CodeSpec`."""

        def ten(a: object) -> Tensor | None:
            return None if a is None else torch.tensor(a, dtype=torch.float32)

        scale = ten(spec.scale)
        assert scale is not None
        return cls(
            spec.scheme,
            spec.bits,
            spec.qmin,
            spec.qmax,
            scale,
            ten(spec.zero_point),
            ten(spec.scale_neg),
            spec.axis,
            spec.signed,
        )


class Quantizer(nn.Module):
    """Base class of all quantisers.

    Subclasses set ``bits``, implement :meth:`forward` (fake quantisation with the method's
    gradient) and :meth:`codes`. ``latent_range`` (BNN: ``(-1, 1)``) asks for the latent weights
    to be clipped after every optimizer step (see :mod:`lowbit.nn.hooks`).
    """

    method: ClassVar[str] = ""
    role: ClassVar[Role] = "weight"
    latent_range: ClassVar[tuple[float, float] | None] = None
    bits: int

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:  # pragma: no cover - abstract
        """Integer codes of ``x`` and the spec that maps them back (``x`` as given to forward)."""
        raise NotImplementedError

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """How an inference runtime quantises this activation quantiser's input ``x``.

        An :class:`lowbit.contract.InputQuant` (``StaticQuant``, ``SignQuant``,
        ``SignMeanAbsQuant`` or ``DynamicMaxAbsQuant``), or None where the evaluation
        forward passes ``x`` through unchanged. ``x`` is an example input (its shape matters,
        e.g. for LSQ's gradient-scaled step). ValueError for a quantiser that has no such form
        (weight quantisers) or is not ready for deployment.
        """
        raise ValueError(f"{type(self).__name__} ({self.role}) has no runtime activation form")

    def extra_repr(self) -> str:
        return f"bits={self.bits}"
