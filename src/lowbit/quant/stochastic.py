"""Stochastic rounding onto a symmetric uniform grid (survey, Guo 2018; Gupta et al. 2015)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import DynamicMaxAbsQuant, InputQuant
from . import ops
from .base import Quantizer, QuantSpec, Role, channel_view
from .functional import (
    MAX_SEED,
    SeededRandom,
    abs_rows,
    check_int,
    check_per_channel,
    check_role,
    signed_bounds,
    straight_through,
    uniform_codes,
    uniform_grid_codes,
)
from .registry import ROLES, register


@register("stochastic", roles=ROLES)
class StochasticRounding(SeededRandom, Quantizer):
    """Stochastic rounding on a symmetric ``bits``-bit grid, weights or activations.

    Scale ``s = max|x| / QP`` (per tensor, or per output channel for weights with
    ``per_channel``), recomputed every call; grid ``[-QN, QP]`` with ``QN = 2^(b-1)``,
    ``QP = 2^(b-1) - 1``.

    * training: ``c = floor(x/s) + Bernoulli(x/s - floor(x/s))``, an unbiased rounding
      (``E[c] = x/s``), clipped to ``[-QN, QP]``; the Bernoulli draws come from the
      module's own stream (:class:`SeededRandom`: a ``torch.Generator``'s, seeded with ``seed``,
      created on the first call on the input's device, afresh if the device changes);
    * evaluation: ``c = round(x/s)`` (half to even), deterministic.

    Output ``s * c``; backward is straight-through (identity to ``x``; ``s`` gets no gradient).
    :meth:`codes` gives the deterministic (evaluation) codes, so ``spec.dequantize(codes)``
    equals ``forward`` in eval mode; a training-mode forward is one random draw around them.

    Args:
        role: ``"weight"`` or ``"activation"``.
        bits: 2..8.
        per_channel: one scale per output channel (dim 0); weights only.
        seed: seed of the module's generator (>= 0).
    """

    def __init__(
        self,
        role: Role = "weight",
        *,
        bits: int = 8,
        per_channel: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.role = check_role(role)  # type: ignore[misc]
        self.bits = check_int("bits", bits, 2, 8)
        self.per_channel = check_per_channel(per_channel, self.role)
        self.seed = check_int("seed", seed, 0, MAX_SEED)
        self._qn, self._qp = signed_bounds(bits, True)

    def _scale(self, x: Tensor) -> Tensor:
        """``s = max|x| / QP`` (at least the dtype's smallest normal): a scalar or ``(C,)``."""
        amax = abs_rows(x, self.per_channel).amax(dim=-1)
        return (amax / self._qp).clamp_min_(torch.finfo(x.dtype).tiny)

    def forward(self, x: Tensor) -> Tensor:
        """Training: ``s * clamp(floor(x / s + u), -QN, QP)`` with ``u ~ U[0, 1)`` (the fused
        ``lowbit::stochastic_round``); ``floor(y + u) = floor(y) + Bernoulli(y - floor(y))``,
        since ``floor(y + u) = floor(y) + 1`` exactly when ``u >= 1 - frac(y)``."""
        s = channel_view(self._scale(x), x.dim(), 0 if self.per_channel else None)
        if self.training:
            return ops.stochastic_round(x, self.uniform_like(x), s, self._qn, self._qp)
        self.rng_state(x.device)  # created in eval too, so a compiled training step finds it
        return straight_through(x, s * uniform_codes(x.detach(), 1.0 / s, -self._qn, self._qp))

    @torch.no_grad()
    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Deterministic codes ``round(x / s)`` in ``[-QN, QP]``; spec ``uniform``, scale ``s``."""
        s = self._scale(x)
        return uniform_grid_codes(x, s, self._qn, self._qp, self.bits, self.per_channel)

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """``DynamicMaxAbsQuant(qmax=QP)``: the evaluation path, whose scale
        ``max|x| / QP`` is taken over the whole input (batch included) at every call."""
        if self.role != "activation":
            return super().runtime_spec(x)
        return DynamicMaxAbsQuant(self._qp)

    def extra_repr(self) -> str:
        return f"role={self.role}, bits={self.bits}, per_channel={self.per_channel}"
