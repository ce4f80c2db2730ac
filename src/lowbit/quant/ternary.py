"""Ternary (2-bit) weight quantisers: TWN and TTQ (METHODS.md, "Ternary").

Both map a layer's latent weights to codes ``{-1, 0, +1}``: TWN with one symmetric scale
``alpha``, TTQ with learned asymmetric scales ``{-Wn, 0, +Wp}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Quantizer, QuantSpec
from .functional import check_real, straight_through
from .registry import register

__all__ = ["MIN_SCALE", "TernaryTTQ", "TernaryTWN", "ternary_spec"]

MIN_SCALE = 1e-6
"""Smallest value TTQ uses for ``Wp``/``Wn`` in forward (keeps the learned scales positive)."""


def ternary_spec(scale: Tensor, scale_neg: Tensor | None = None) -> QuantSpec:
    """The :class:`QuantSpec` of codes ``{-1, 0, +1}``: real ``scale * c`` (``scale_neg * c``
    for ``c < 0`` when given)."""
    neg = None if scale_neg is None else scale_neg.detach()
    return QuantSpec(scheme="ternary", bits=2, qmin=-1, qmax=1, scale=scale.detach(), scale_neg=neg)


def _ternary_codes(pos: Tensor, neg: Tensor) -> Tensor:
    """int8 codes: +1 on ``pos``, -1 on ``neg``, 0 elsewhere."""
    return pos.to(torch.int8) - neg.to(torch.int8)


@register("twn", roles=("weight",))
class TernaryTWN(Quantizer):
    """Ternary Weight Networks (Li 2016), one scale per layer.

    ``delta = delta_factor * mean(|W|)`` (default 0.7); ``wt = +1 if w > delta, -1 if
    w < -delta, else 0``; ``alpha = mean(|w_i|) over {i : |w_i| > delta}`` (0 when that set is
    empty); forward ``alpha * wt``. Backward: identity STE to ``w`` with ``alpha`` treated as a
    constant (detached), i.e. ``dw = g``.
    """

    def __init__(self, *, delta_factor: float = 0.7) -> None:
        super().__init__()
        self.delta_factor = check_real("delta_factor", delta_factor, 0.0)
        self.bits = 2

    def _ternarize(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(pos, neg, alpha)``: the regions ``w > delta``, ``w < -delta`` and the scale."""
        a = w.detach().abs()
        delta = self.delta_factor * a.mean()
        pos, neg = w.detach() > delta, w.detach() < -delta
        kept = pos | neg
        alpha = (a * kept).sum() / kept.sum().clamp_min(1)
        return pos, neg, alpha

    def forward(self, x: Tensor) -> Tensor:
        pos, neg, alpha = self._ternarize(x)
        return straight_through(x, alpha * (pos.to(x.dtype) - neg.to(x.dtype)))

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``wt`` in ``{-1, 0, +1}``; scale ``alpha`` (0-d), symmetric."""
        pos, neg, alpha = self._ternarize(x)
        return _ternary_codes(pos, neg), ternary_spec(alpha)

    def extra_repr(self) -> str:
        return f"bits=2, delta_factor={self.delta_factor}"


def _ttq_regions(w: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TTQ's normalisation and regions for latent weights ``w`` (no gradient).

    Returns ``(wn, pos, neg, m)`` with ``m = max|w|`` (1 when ``w`` is all zero, so that
    ``wn = w / m`` stays finite), ``delta = threshold * max|wn|``, ``pos = wn > delta`` (Ip) and
    ``neg = wn < -delta`` (In).
    """
    wd = w.detach()
    lo, hi = torch.aminmax(wd)
    m = torch.maximum(hi, -lo)
    nonzero = m > 0
    m = torch.where(nonzero, m, torch.ones_like(m))
    wn = wd / m
    # max|wn| is exactly 1 (the largest |w_i| divided by itself; division by m > 0 is monotone)
    # or 0 for all-zero w, so it needs no second pass over the weights.
    delta = threshold * nonzero.to(wn.dtype)
    return wn, wn > delta, wn < -delta, m


def _clamped_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The value of a TTQ scale as used in forward: ``max(scale, MIN_SCALE)`` in ``dtype``."""
    return scale.detach().clamp_min(MIN_SCALE).to(dtype)


class _TTQFunction(torch.autograd.Function):
    """TTQ forward/backward (Zhu 2016, with the chain-rule sign for ``Wn``).

    The regions are kept as float 0/1 masks ``P`` (Ip) and ``N`` (In), and every select is
    plain arithmetic, which is exact here because one of the two terms is always 0:
    ``wq = P Wp - N Wn`` and ``lr_mult = (1 - P - N) + P Wp + N Wn`` (a CPU ``torch.where``
    with scalar branches is several times slower than these vectorised passes).
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, wp: Tensor, wn: Tensor, threshold: float) -> Tensor:
        _, pos, neg, m = _ttq_regions(w, threshold)
        vp, vn = _clamped_scale(wp, w.dtype), _clamped_scale(wn, w.dtype)
        p, n = pos.to(w.dtype), neg.to(w.dtype)
        ctx.save_for_backward(p, n, vp, vn, m)
        ctx.scale_dtypes = (wp.dtype, wn.dtype)
        return (p * vp).sub_(n * vn)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor, Tensor, None]:
        p, n, vp, vn, m = ctx.saved_tensors
        dtype_p, dtype_n = ctx.scale_dtypes
        grad_w = None
        if ctx.needs_input_grad[0]:
            lr_mult = torch.addcmul(torch.addcmul((1.0 - p).sub_(n), p, vp), n, vn)
            grad_w = (g * lr_mult).div_(m)
        grad_wp = (g * p).sum().to(dtype_p)
        grad_wn = -(g * n).sum().to(dtype_n)
        return grad_w, grad_wp, grad_wn, None


@register("ttq", roles=("weight",))
class TernaryTTQ(Quantizer):
    """Trained Ternary Quantization (Zhu 2016), learned scales ``Wp, Wn > 0`` per layer.

    Forward: ``wn = w / max|w|``, ``delta = t * max|wn|`` (``t = threshold``, default 0.05),
    ``wq = Wp if wn > delta (Ip); 0 if |wn| <= delta; -Wn if wn < -delta (In)``.

    Backward (custom autograd function):

    * ``dL/dWp = sum_{i in Ip} g_i`` and ``dL/dWn = -sum_{i in In} g_i`` -- the chain-rule sign
      of ``wq = Wp 1{Ip} - Wn 1{In}``; the paper's Eq. 6 prints the second without the minus.
    * Scaled STE to the normalised weights: ``dL/dwn_i = Wp g_i`` on Ip, ``g_i`` where
      ``|wn_i| <= delta``, ``Wn g_i`` on In. This is chained through ``wn = w / max|w|`` with
      ``max|w|`` a constant, so what reaches the latent weight is
      ``dL/dw_i = dL/dwn_i / max|w|`` (the ``1 / max|w|`` factor is applied).

    Scales: ``wp``/``wn`` are ``nn.Parameter`` scalars, initialised on the first forward (or by
    :meth:`init_from`) to mean ``|wn|`` over Ip / In (1.0 for an empty region). The buffer
    ``initialized`` (uint8, in the state dict) stops a loaded model from re-initialising. They
    are kept positive in forward: the value used is ``max(W, MIN_SCALE)``, while the gradient
    reaches the parameter unchanged (a straight-through clamp), so a scale pushed below
    ``MIN_SCALE`` by an optimizer step can recover. :meth:`codes` uses the same clamped values;
    ``lr_mult`` in backward uses them too.
    """

    def __init__(self, *, threshold: float = 0.05) -> None:
        super().__init__()
        self.threshold = check_real("threshold", threshold, 0.0, 1.0)
        self.bits = 2
        self.wp = nn.Parameter(torch.ones(()))
        self.wn = nn.Parameter(torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._ready = False  # Python mirror of ``initialized``: no host sync after the first call
        self.register_load_state_dict_post_hook(TernaryTTQ._reset_after_load)

    @staticmethod
    def _reset_after_load(module: TernaryTTQ, _incompatible: Any) -> None:
        module._ready = False

    @torch.no_grad()
    def init_from(self, w: Tensor) -> None:
        """Set ``Wp``/``Wn`` to mean ``|wn|`` over Ip / In of ``w`` and mark them initialised."""
        wn, pos, neg, _ = _ttq_regions(w, self.threshold)
        for param, region in ((self.wp, pos), (self.wn, neg)):
            count = region.sum()
            mean = (wn.abs() * region).sum() / count.clamp_min(1)
            value = torch.where(count > 0, mean, torch.ones_like(mean))
            param.copy_(value.clamp_min(MIN_SCALE))
        self.initialized.fill_(1)

    def _ensure_init(self, w: Tensor) -> None:
        """Initialise from ``w`` unless done; reads the buffer once (a host sync), then only the
        Python flag, so a compiled forward has no branch on data."""
        if not self._ready:
            if not bool(self.initialized):
                self.init_from(w)
            self._ready = True

    def forward(self, x: Tensor) -> Tensor:
        self._ensure_init(x)
        return _TTQFunction.apply(x, self.wp, self.wn, self.threshold)

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes in ``{-1, 0, +1}``; scale ``Wp``, ``scale_neg`` ``Wn`` (as used in forward).

        Like :meth:`forward`, initialises the scales from ``x`` if that has not happened yet.
        """
        self._ensure_init(x)
        _, pos, neg, _ = _ttq_regions(x, self.threshold)
        spec = ternary_spec(_clamped_scale(self.wp, x.dtype), _clamped_scale(self.wn, x.dtype))
        return _ternary_codes(pos, neg), spec

    def sparsity(self, w: Tensor) -> float:
        """Share of zero codes (``|wn| <= delta``) for latent weights ``w``."""
        _, pos, neg, _ = _ttq_regions(w, self.threshold)
        return 1.0 - (pos | neg).sum().item() / max(w.numel(), 1)

    def extra_repr(self) -> str:
        return f"bits=2, threshold={self.threshold}"
