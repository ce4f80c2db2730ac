"""PACT: parameterised clipping activation (Choi et al. 2018).

``y = clip(x, 0, alpha)`` with a learned clipping level ``alpha``, then a uniform ``k``-bit grid
on ``[0, alpha]``: ``yq = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..contract import InputQuant, StaticQuant
from . import ops
from .base import Quantizer, QuantSpec
from .functional import (
    CODE_DTYPE,
    check_int,
    check_real,
    positive,
    static_runtime_spec,
    uniform_codes,
)
from .registry import register


def clipped_uniform(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """Fake-quantise ``x`` to ``bits`` bits on ``[0, alpha]`` with PACT's gradients.

    ``round(clip(x, 0, alpha) * n / alpha) * alpha / n`` (``n = 2^bits - 1``), the fused
    ``lowbit::clipped_uniform`` operator. Backward: ``dyq/dx = 1{0 <= x < alpha}`` and
    ``dyq/dalpha = 1{x >= alpha}`` (PACT's rule: the rounding is passed straight through, so
    only the clip decides). At ``x = alpha`` the gradient goes to ``alpha``, not to ``x``; at
    ``x = 0`` it goes to ``x``.
    """
    return ops.clipped_uniform(x, alpha, 2**bits - 1)


def clipped_uniform_runtime_spec(alpha: Tensor, bits: int) -> StaticQuant:
    """Static grid of :func:`clipped_uniform`: scale ``alpha / n``, multiplier ``n / alpha``."""
    n = 2**bits - 1
    with torch.no_grad():
        spec = QuantSpec("uniform", bits, 0, n, scale=(alpha / n).detach(), signed=False)
        return static_runtime_spec(spec, n / alpha)


def clipped_uniform_codes(x: Tensor, alpha: Tensor, bits: int) -> tuple[Tensor, QuantSpec]:
    """Codes in ``[0, 2^k - 1]`` and the unsigned ``uniform`` spec of :func:`clipped_uniform`."""
    n = 2**bits - 1
    with torch.no_grad():
        c = uniform_codes(x, n / alpha, 0, n)
        spec = QuantSpec("uniform", bits, 0, n, scale=(alpha / n).detach(), signed=False)
    return c.to(CODE_DTYPE), spec


@register("pact", roles=("activation",))
class PACT(Quantizer):
    """PACT (Choi et al. 2018): ``yq = round(clip(x, 0, a) * (2^k - 1) / a) * a / (2^k - 1)``.

    ``a`` is the learned clipping level ``alpha``.

    ``alpha`` is an ``nn.Parameter`` (per tensor); the value used is ``max(|alpha|, tiny)``.
    Gradients: ``dyq/dx = 1{0 <= x < alpha}``, ``dyq/dalpha = 1{x >= alpha}`` (see
    :func:`clipped_uniform`).

    Args:
        bits: 1..8.
        alpha_init: initial clipping level (> 0).
        alpha_decay: the L2 coefficient ``lambda`` on alpha (>= 0), used by
            :meth:`regularization`.
    """

    def __init__(
        self, *, bits: int = 4, alpha_init: float = 10.0, alpha_decay: float = 2e-4
    ) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 1, 8)
        alpha_init = check_real("alpha_init", alpha_init, 0.0, low_open=True)
        self.alpha_decay = check_real("alpha_decay", alpha_decay, 0.0)
        self.alpha = nn.Parameter(torch.tensor(alpha_init))

    def forward(self, x: Tensor) -> Tensor:
        return clipped_uniform(x, positive(self.alpha), self.bits)

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``round(clip(x, 0, alpha) / s)``, unsigned ``uniform``, ``s = alpha / (2^k-1)``."""
        return clipped_uniform_codes(x, positive(self.alpha), self.bits)

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """Static unsigned grid on ``[0, alpha]`` (see :func:`clipped_uniform_runtime_spec`)."""
        return clipped_uniform_runtime_spec(positive(self.alpha), self.bits)

    def regularization(self) -> Tensor:
        """``alpha_decay / 2 * alpha^2``, the L2 term to add to the loss.

        The lambda is included (so a trainer can sum this over all modules) and halved, so the
        gradient ``alpha_decay * alpha`` equals plain weight decay ``alpha_decay`` on alpha.
        """
        return 0.5 * self.alpha_decay * self.alpha.square()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha_decay={self.alpha_decay}"
