"""DoReFa-Net weight and activation quantisers (Zhou et al. 2016).

``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` for ``r in [0, 1]``, with a straight-through
gradient through ``round``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, QuantSpec, round_ste
from .lsq import CODE_DTYPE, check_int, positive, ste
from .pact import clipped_uniform, clipped_uniform_codes
from .registry import register


@register("dorefa", roles=("weight",))
class DoReFaWeight(Quantizer):
    """DoReFa weights (Zhou et al. 2016).

    ``k >= 2``: ``wq = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``. Only ``round`` is
    straight-through; the gradient flows through ``tanh`` and the normalisation, including
    ``max|tanh(w)|`` (as in the reference implementation). An all-zero layer uses
    ``max|tanh| = tiny`` (no division by zero); with no zero level it maps to ``+-1/(2^k-1)``.
    Codes ``i in [0, 2^k - 1]`` with
    ``wq = scale * (i - zero_point)``, ``scale = 2 / (2^k - 1)``, ``zero_point = (2^k - 1) / 2``
    (forward computes this product, so it equals ``2 i / (2^k - 1) - 1`` up to one rounding).

    ``k = 1``: ``wq = sign(w) * mean|w|`` over the whole layer, ``sign(0) = +1``; the gradient
    reaches ``w`` unchanged (pure STE, ``mean|w|`` treated as a constant, as in the paper).

    Args:
        bits: 1..8.
    """

    def __init__(self, *, bits: int = 4) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 1, 8)

    def _quantize(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        """Float codes (k >= 2: carrying the STE gradient) and the spec they dequantise with."""
        if self.bits == 1:
            c = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
            return c, QuantSpec("binary", 1, -1, 1, scale=w.detach().abs().mean())
        n = 2**self.bits - 1
        t = torch.tanh(w)
        r = (t / (2 * positive(t.abs().amax())) + 0.5) * n  # in [0, n] up to an ulp
        spec = QuantSpec(
            "uniform",
            self.bits,
            0,
            n,
            scale=torch.full((), 2 / n, dtype=w.dtype, device=w.device),
            zero_point=torch.full((), n / 2, dtype=w.dtype, device=w.device),
            signed=False,
        )
        return round_ste(r), spec

    def forward(self, w: Tensor) -> Tensor:
        c, spec = self._quantize(w)
        q = spec.dequantize(c)
        return ste(w, q) if self.bits == 1 else q

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes in ``[0, 2^k - 1]`` (``uniform``, float zero point), or ``{-1, +1}`` at 1 bit."""
        c, spec = self._quantize(w)
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

    def _one(self, x: Tensor) -> Tensor:
        return torch.ones((), dtype=x.dtype, device=x.device)

    def forward(self, x: Tensor) -> Tensor:
        return clipped_uniform(x, self._one(x), self.bits)

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        return clipped_uniform_codes(x, self._one(x), self.bits)
