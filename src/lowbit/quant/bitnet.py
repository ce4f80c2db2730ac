"""BitNet b1.58 (Ma et al. 2024): ternary absmean weights, per-token absmax activations.

* weights (``bitnet``): ``gamma = mean|W|`` over the whole tensor,
  ``W_q = RoundClip(W / (gamma + eps), -1, 1) * gamma`` with ``RoundClip(v, a, b) =
  max(a, min(b, round(v)))``; codes in ``{-1, 0, +1}``, a symmetric ``ternary`` spec of scale
  ``gamma``.
* activations (``absmax``, and ``bitnet`` which adds the norm): with ``Qb = 2^(b-1) - 1`` (127
  for 8 bits) and ``gamma_x = max(max|x|, eps)`` per token (or per group or tensor, see
  :mod:`lowbit.quant.granularity`), ``x_q = Clip(round(x * Qb / gamma_x), -Qb - 1, Qb) *
  gamma_x / Qb``; a ``uniform`` spec whose scale ``gamma_x / Qb`` has one value per token.
* ``norm``: BitLinear's normalisation of the layer input before activation quantisation, here a
  parameter-free RMSNorm ``x / sqrt(mean(x^2) + norm_eps)`` over the last dimension (how it
  composes with a model's own norms: docs/methods.md, "BitNet b1.58").

Gradients are straight-through: ``dW = g`` and ``dx = g`` (through the norm when on), the
scales ``gamma`` and ``gamma_x`` being constants in backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, QuantSpec
from .functional import (
    CODE_DTYPE,
    check_bool,
    check_int,
    check_real,
    signed_bounds,
    straight_through,
    uniform_codes,
)
from .granularity import absmax, check_granularity, grouped
from .registry import register
from .ternary import ternary_spec

__all__ = ["AbsMaxActivation", "BitNetActivation", "BitNetWeight", "rms_normalize"]


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """Parameter-free RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps)``.

    The mean square is taken in at least float32 (float16 under AMP would overflow above 256).
    """
    ms = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(ms + eps).to(x.dtype)


@register("bitnet", roles=("weight",))
class BitNetWeight(Quantizer):
    """BitNet b1.58's absmean ternary weights (Ma et al. 2024, Eqs. 1-3), one scale per tensor.

    Forward ``RoundClip(W / (gamma + eps), -1, 1) * gamma``, ``gamma = mean|W|``; backward the
    identity straight-through estimator (``dW = g``, ``gamma`` constant).
    """

    def __init__(self, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = check_real("eps", eps, 0.0, low_open=True)
        self.bits = 2

    def _ternarize(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Float codes in ``{-1, 0, 1}`` and ``gamma`` (both detached)."""
        wd = w.detach()
        gamma = wd.abs().mean()
        # + 0.0 turns round's -0.0 into +0.0, so the forward equals the dequantised codes bitwise
        return (wd / (gamma + self.eps)).round_().clamp_(-1, 1).add_(0.0), gamma

    def forward(self, x: Tensor) -> Tensor:
        codes, gamma = self._ternarize(x)
        return straight_through(x, codes * gamma)

    @torch.no_grad()
    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """int8 codes in ``{-1, 0, 1}``; symmetric ``ternary`` spec of scale ``mean|W|``."""
        codes, gamma = self._ternarize(x)
        return codes.to(torch.int8), ternary_spec(gamma)

    def extra_repr(self) -> str:
        return f"bits=2, eps={self.eps}"


@register("absmax", roles=("activation",))
class AbsMaxActivation(Quantizer):
    """Dynamic symmetric absmax quantisation of activations, per token by default.

    ``x_q = Clip(round(x * Qb / gamma_x), -Qb - 1, Qb) * gamma_x / Qb`` with ``Qb = 2^(b-1) -
    1`` and ``gamma_x = max(max|x|, eps)`` over each token (``granularity: token``), each group
    of ``group_size`` features (``group``) or the whole input (``tensor``). No state: the scale
    is recomputed at every call, in training and evaluation alike. With ``norm`` the input is
    first RMS-normalised (:func:`rms_normalize`). Backward: ``dx = g`` (through the norm).

    :meth:`codes` returns codes shaped like the :func:`~lowbit.quant.granularity.grouped` view
    (``x``'s shape, except ``(..., D / g, g)`` for groups) and a ``uniform`` spec whose scale
    broadcasts against them; ``spec.dequantize(codes).reshape(x.shape)`` is the forward output
    bit for bit.

    Args:
        bits: 2..8 (8: BitNet's int8).
        granularity: ``token``, ``group`` or ``tensor``; group_size: features per group.
        norm: RMS-normalise the input first (BitLinear); norm_eps: its epsilon.
        eps: the floor of ``gamma_x`` (an all-zero token quantises to zeros).
    """

    default_norm = False

    def __init__(
        self,
        *,
        bits: int = 8,
        granularity: str = "token",
        group_size: int | None = None,
        norm: bool | None = None,
        norm_eps: float = 1e-6,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 2, 8)
        self.granularity, self.group_size = check_granularity(granularity, group_size)
        self.norm = self.default_norm if norm is None else check_bool("norm", norm)
        self.norm_eps = check_real("norm_eps", norm_eps, 0.0, low_open=True)
        self.eps = check_real("eps", eps, 0.0, low_open=True)
        self._qn, self._qp = signed_bounds(self.bits, True)

    def _codes_and_scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(input after the norm, float codes in the grouped view, scale gamma_x / Qb)``."""
        xn = rms_normalize(x, self.norm_eps) if self.norm else x
        v = grouped(xn, self.granularity, self.group_size)
        gamma = absmax(v, self.eps)
        codes = uniform_codes(v.detach(), self._qp / gamma, -self._qn, self._qp).add_(0.0)
        return xn, codes, gamma / self._qp

    def forward(self, x: Tensor) -> Tensor:
        xn, codes, scale = self._codes_and_scale(x)
        return straight_through(xn, (codes * scale).reshape(x.shape))

    @torch.no_grad()
    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Integer codes in ``[-Qb - 1, Qb]`` and their ``uniform`` spec (see the class doc)."""
        _, codes, scale = self._codes_and_scale(x)
        if self.granularity == "tensor":
            codes, scale = codes.reshape(x.shape), scale.reshape(())
        spec = QuantSpec("uniform", self.bits, -self._qn, self._qp, scale=scale)
        return codes.to(CODE_DTYPE), spec

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}, granularity={self.granularity}{group}, norm={self.norm}"


@register("bitnet", roles=("activation",))
class BitNetActivation(AbsMaxActivation):
    """BitLinear's input path (Ma et al. 2024): RMSNorm, then 8-bit per-token absmax.

    :class:`AbsMaxActivation` with ``norm`` on by default; ``norm: false`` leaves the
    normalisation to the model (see docs/methods.md).
    """

    default_norm = True
