"""DoReFa-Net weight and activation quantisers (Zhou et al. 2016).

``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` for ``r in [0, 1]``, with a straight-through
gradient through ``round``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import InputQuant
from .base import Quantizer, QuantSpec
from .binary import binary_spec, sign_levels
from .functional import CODE_DTYPE, check_int, positive, scalar_like, straight_through
from .pact import clipped_uniform, clipped_uniform_codes, clipped_uniform_runtime_spec
from .registry import register


@register("dorefa", roles=("weight",))
class DoReFaWeight(Quantizer):
    """DoReFa weights (Zhou et al. 2016).

    ``k >= 2``: ``wq = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``, computed as
    ``u = tanh(w) / max|tanh(w)|`` in ``[-1, 1]`` and codes ``i = round((u + 1) (2^k - 1) / 2)``.
    Only ``round`` is straight-through, so the gradient is that of ``u`` (through ``tanh`` and
    the normalisation, ``max|tanh(w)|`` included, as in the reference implementation). An
    all-zero layer uses ``max|tanh| = tiny``; with no zero level it maps to ``+-1/(2^k-1)``.
    ``wq = scale * (i - zero_point)`` with ``scale = 2 / (2^k - 1)`` and
    ``zero_point = (2^k - 1) / 2``: forward computes this product, so it equals
    ``2 i / (2^k - 1) - 1`` up to one rounding.

    ``k = 1``: ``wq = sign(w) * mean|w|`` over the whole layer, ``sign(0) = +1``; the gradient
    reaches ``w`` unchanged (pure STE, ``mean|w|`` treated as a constant, as in the paper).

    Args:
        bits: 1..8.
    """

    def __init__(self, *, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 1, 8)

    def _codes(self, v: Tensor) -> tuple[Tensor, QuantSpec]:
        """Float codes of ``v`` (``w`` at 1 bit, ``u`` at k bits) and their spec; no gradient."""
        v = v.detach()
        if self.bits == 1:
            return sign_levels(v), binary_spec(v.abs().mean())
        n = 2**self.bits - 1
        c = ((v + 1) * (n / 2)).round_()  # u in [-1, 1] up to an ulp, so c in [0, n]
        spec = QuantSpec(
            "uniform",
            self.bits,
            0,
            n,
            scale=scalar_like(v, 2 / n),
            zero_point=scalar_like(v, n / 2),
            signed=False,
        )
        return c, spec

    def _normalised(self, w: Tensor) -> Tensor:
        """``u = tanh(w) / max|tanh(w)|`` for k >= 2 (with gradient); ``w`` itself at 1 bit."""
        if self.bits == 1:
            return w
        t = torch.tanh(w)
        return t * (1 / positive(t.abs().amax()))

    def forward(self, w: Tensor) -> Tensor:
        u = self._normalised(w)
        c, spec = self._codes(u)
        return straight_through(u, spec.dequantize(c))

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes in ``[0, 2^k - 1]`` (``uniform``, float zero point), or ``{-1, +1}`` at 1 bit."""
        c, spec = self._codes(self._normalised(w))
        return c.to(CODE_DTYPE), spec


@register("dorefa", roles=("activation",))
class DoReFaActivation(Quantizer):
    """DoReFa activations (Zhou et al. 2016): ``xq = quantize_k(clip(x, 0, 1))``.

    Straight-through inside the clip range, zero gradient outside. Shares PACT's kernel with a
    fixed ``alpha = 1``, hence its boundary convention: ``dxq/dx = 1{0 <= x < 1}``. Codes in
    ``[0, 2^k - 1]``, unsigned ``uniform`` with ``scale = 1 / (2^k - 1)``.

    Args:
        bits: 1..8.
    """

    def __init__(self, *, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 1, 8)

    def forward(self, x: Tensor) -> Tensor:
        return clipped_uniform(x, scalar_like(x, 1.0), self.bits)

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        return clipped_uniform_codes(x, scalar_like(x, 1.0), self.bits)

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """Static unsigned grid on ``[0, 1]``, scale ``1 / (2^k - 1)``."""
        return clipped_uniform_runtime_spec(scalar_like(x, 1.0), self.bits)
