"""Power-of-two (logarithmic) weight quantisation (survey, Guo 2018; INQ, Zhou et al. 2017)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Quantizer, QuantSpec
from .functional import CODE_DTYPE, check_choice, check_int, positive, straight_through
from .registry import register

ZERO_BELOW = ("level", "half")


@register("pow2", roles=("weight",))
class PowerOfTwo(Quantizer):
    """Power-of-two weights: ``wq = sign(w) * 2^round(log2|w|)`` on ``n`` levels, or 0.

    ``bits`` = one sign bit + magnitude codes, so there are ``n = 2^(bits-1) - 1`` exponent
    levels; codes lie in ``[-n, n]`` and code 0 is the value 0. Per layer,
    ``e_max = round(log2(max|w|))`` (round half to even on the log), and the levels are
    ``2^e`` for ``e in [e_max - n + 1, e_max]``. An element maps to
    ``sign(w) * 2^clip(round(log2|w|), e_max - n + 1, e_max)`` unless ``|w|`` is under the
    zero threshold, where it maps to 0:

    * ``zero_below="level"`` (default, METHODS.md literally): ``|w| < 2^(e_max - n + 1)``,
      the smallest level;
    * ``zero_below="half"``: ``|w| < 2^(e_max - n)``, half the smallest level (INQ's rule: 0 or
      the smallest level, whichever is nearer).

    Codes ``c`` dequantise as ``sign(c) * 2^e_max * 2^(|c| - n)`` (scheme ``pow2``,
    ``scale = 2^e_max``). Backward: straight-through to ``w`` (identity gradient).

    Args:
        bits: 2..8.
        zero_below: ``"level"`` or ``"half"``, see above.
    """

    def __init__(self, *, bits: int = 4, zero_below: str = "level") -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 2, 8)
        self.zero_below = check_choice("zero_below", zero_below, ZERO_BELOW)
        self.levels = 2 ** (bits - 1) - 1

    def _quantize(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        """Signed float codes in ``[-n, n]`` and their ``pow2`` spec."""
        n = self.levels
        a = w.detach().abs()
        e_max = torch.round(torch.log2(positive(a.amax())))
        e_low = e_max - n  # code |c| = e - e_low, so the smallest level has code 1
        mag = (torch.round(torch.log2(a)) - e_low).clamp_(1, n)
        threshold = torch.exp2(e_low + (1 if self.zero_below == "level" else 0))
        c = torch.where(a < threshold, 0.0, mag) * torch.sign(w.detach())
        return c, QuantSpec("pow2", self.bits, -n, n, scale=torch.exp2(e_max))

    def forward(self, w: Tensor) -> Tensor:
        c, spec = self._quantize(w)
        return straight_through(w, spec.dequantize(c))

    @torch.no_grad()
    def codes(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        c, spec = self._quantize(w)
        return c.to(CODE_DTYPE), spec

    def extra_repr(self) -> str:
        return f"bits={self.bits}, zero_below={self.zero_below!r}"
