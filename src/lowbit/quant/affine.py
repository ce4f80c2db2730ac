"""Affine (asymmetric) 8-bit quantisation for integer-only inference (Jacob et al. 2018).

Real values map to integers by ``r = S (q - Z)`` with a float scale ``S > 0`` and an integer zero
point ``Z in [qmin, qmax]`` chosen so that real 0 is exactly representable.

* :class:`AffineActivation` -- uint8, asymmetric, per tensor; the range ``[a, b]`` is an
  exponential moving average of batch min/max during training (Jacob Sec. 3.1), optionally
  delayed ``quant_delay`` steps.
* :class:`AffineWeight` -- int8 symmetric (``Z = 0``, ``q in [-127, 127]``), per output channel
  by default, with ``S = max|w| / 127`` from the current weights.

Both fake-quantise with PyTorch's fused fake-quant kernels: forward
``S (clamp(round(x / S) + Z, qmin, qmax) - Z)``, backward the straight-through estimator with
clipping, ``dx = g * 1{qmin <= round(x / S) + Z <= qmax}``. The fixed-point arithmetic of the
integer engine lives in :mod:`lowbit.fixedpoint`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..contract import InputQuant
from . import ops
from .base import Quantizer, QuantSpec, channel_view
from .functional import abs_rows, check_int, check_real, static_runtime_spec
from .registry import register

EPS = torch.finfo(torch.float32).eps  # smallest scale, as torch.ao.quantization observers use


def nudge_range(
    min_val: Tensor | float, max_val: Tensor | float, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """Scale and zero point for the range ``[min_val, max_val]`` on the grid ``[qmin, qmax]``.

    Nudging rule (Jacob Sec. 2.1; the convention of ``torch.ao.quantization`` min/max observers):

    1. extend the range to contain 0: ``a = min(min_val, 0)``, ``b = max(max_val, 0)``;
    2. ``S = max((b - a) / (qmax - qmin), eps)`` with ``eps`` the float32 machine epsilon, so a
       degenerate range (``a = b = 0``) gives a tiny positive scale, never a division by zero;
    3. ``Z = clamp(qmin - round(a / S), qmin, qmax)`` (round half to even).

    Real 0 is then exactly the integer ``Z``; the representable range becomes
    ``[S (qmin - Z), S (qmax - Z)]``, which differs from ``[a, b]`` by less than ``S / 2`` at each
    end (a range already anchored at 0, e.g. ``[0, b]``, is kept exactly). Works elementwise on
    tensors (per-channel ranges) without leaving the device.

    Returns ``(scale, zero_point)``: float32 and int32 tensors of the broadcast shape of the
    inputs, on their device.
    """
    if qmin >= qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")
    if isinstance(min_val, float | int) and isinstance(max_val, float | int) and min_val > max_val:
        raise ValueError(f"min_val must be <= max_val, got min_val={min_val}, max_val={max_val}")
    lo = torch.as_tensor(min_val, dtype=torch.float32).clamp(max=0.0)
    hi = torch.as_tensor(max_val, dtype=torch.float32).clamp(min=0.0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp(min=EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None
) -> Tensor:
    """``S (clamp(round(x / S) + Z, qmin, qmax) - Z)`` with the clipping STE in backward.

    Per tensor (``axis`` None) by the fused ``lowbit::affine_quant`` (PyTorch's values), or per
    channel along ``axis`` by PyTorch's fused fake-quant op.
    The per-channel op checks an *integer* zero point's range with a host sync, so it is given
    as float (exact for integers up to 2^24).
    """
    if axis is None:  # the same values as torch.fake_quantize_per_tensor_affine, fused kernels
        return ops.affine_quant(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale, zero_point.to(torch.float32), axis, qmin, qmax
    )


def _codes_of(y: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes of a fake-quantised ``y = S (c - Z)``: ``c = round(y / S) + Z``.

    Reading the codes back from the forward output (rather than re-deriving them from the input)
    makes ``spec.dequantize(codes) == forward(x)`` hold bit for bit whatever kernel ran forward.
    """
    nd = y.dim()
    s = channel_view(spec.scale, nd, spec.axis)
    z = channel_view(spec.zero_point, nd, spec.axis)
    return (torch.round(y.to(s.dtype) / s) + z).clamp(spec.qmin, spec.qmax).to(torch.int32)


class _AffineQuantizer(Quantizer):
    """What both affine quantisers share: the grid ``[qmin, qmax]``, the scale ``axis`` (None:
    per tensor), fake quantisation by :func:`fake_quant` and codes read back from its output.

    Subclasses set ``bits``, ``qmin``, ``qmax`` and ``axis`` and say whether the grid is
    ``signed``.
    """

    signed: ClassVar[bool]
    qmin: int
    qmax: int
    axis: int | None = None

    def _fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        return fake_quant(x, scale, zero_point, self.qmin, self.qmax, self.axis)

    def _spec(self, scale: Tensor, zero_point: Tensor) -> QuantSpec:
        """The ``affine`` spec of this grid under ``(scale, zero_point)``."""
        return QuantSpec(
            scheme="affine",
            bits=self.bits,
            qmin=self.qmin,
            qmax=self.qmax,
            scale=scale,
            zero_point=zero_point,
            axis=self.axis,
            signed=self.signed,
        )

    def _codes(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes of ``x`` under ``(scale, zero_point)`` and their ``affine`` spec."""
        spec = self._spec(scale, zero_point)
        return _codes_of(self._fake_quant(x.detach(), scale, zero_point), spec), spec


@register("affine", roles=("activation",))
class AffineActivation(_AffineQuantizer):
    """Asymmetric per-tensor activation quantiser with an EMA range (Jacob et al. 2018).

    Grid ``[0, 2^bits - 1]`` (uint8 by default). In training each forward updates

        min_val <- d * min_val + (1 - d) * min(x),   max_val <- d * max_val + (1 - d) * max(x)

    with ``d = ema_decay`` (the first batch sets the buffers directly), then fake-quantises ``x``
    with ``(S, Z) = nudge_range(min_val, max_val, 0, 2^bits - 1)``. For the first ``quant_delay``
    training forwards (counted in the ``steps`` buffer) the input passes through unchanged while
    the EMA still updates. Eval mode uses the stored range without updating it, and passes
    through while no range has been observed or the delay has not elapsed.

    Buffers (saved in the state dict): ``min_val``, ``max_val`` (float32), ``initialized``
    (bool), ``steps`` (int64). No host syncs in forward.
    """

    signed = False

    def __init__(self, bits: int = 8, ema_decay: float = 0.99, quant_delay: int = 0) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 2, 8)
        self.qmin, self.qmax = 0, 2**bits - 1
        self.ema_decay = check_real("ema_decay", ema_decay, 0.0, 1.0)
        self.quant_delay = check_int("quant_delay", quant_delay, 0)
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` of the stored range (see :func:`nudge_range`)."""
        return nudge_range(self.min_val, self.max_val, self.qmin, self.qmax)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        """EMA update of the range from a batch, and one more step counted."""
        lo, hi = torch.aminmax(x.detach())
        d = self.ema_decay
        for buf, new in ((self.min_val, lo), (self.max_val, hi)):
            new = new.to(buf.dtype)
            buf.copy_(torch.where(self.initialized, d * buf + (1.0 - d) * new, new))
        self.initialized.fill_(True)
        self.steps.add_(1)

    def forward(self, x: Tensor) -> Tensor:
        # The delay is judged on the step count before this forward: steps 0..quant_delay-1 pass.
        if self.training:
            passthrough = self.steps < self.quant_delay if self.quant_delay else None
            self._observe(x)
        else:
            passthrough = (self.steps < self.quant_delay) | ~self.initialized
        y = self._fake_quant(x, *self.qparams())
        return y if passthrough is None else torch.where(passthrough, x, y)

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes of ``x`` under the stored range (the eval-mode forward, ignoring the delay)."""
        return self._codes(x, *self.qparams())

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """Static ``affine`` grid of the stored range; None while eval passes ``x`` through (no
        range observed yet, or the delay not elapsed). PyTorch's fake-quant kernel multiplies
        by ``1 / S``, which is the multiplier given."""
        if not bool(self.initialized) or int(self.steps) < self.quant_delay:
            return None
        scale, zero_point = self.qparams()
        return static_runtime_spec(self._spec(scale, zero_point), 1.0 / scale)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema_decay={self.ema_decay}, quant_delay={self.quant_delay}"


@register("affine", roles=("weight",))
class AffineWeight(_AffineQuantizer):
    """Symmetric signed weight quantiser, per output channel by default (Jacob et al. 2018).

    Grid ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (``[-127, 127]`` for 8 bits), ``Z = 0``, and
    ``S = max(max|w| / qmax, eps)`` per output channel (dim 0) or per tensor, computed from the
    current weights at every forward (no state). ``S`` carries no gradient; ``w`` gets the
    clipping STE, which is the identity here since ``|w| / S <= qmax``.
    """

    signed = True

    def __init__(self, bits: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        self.bits = check_int("bits", bits, 2, 8)
        self.qmax = 2 ** (bits - 1) - 1
        self.qmin = -self.qmax
        self.per_channel = per_channel

    @property
    def axis(self) -> int | None:  # type: ignore[override]
        return 0 if self.per_channel else None

    def qparams(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for weights ``w``: ``max|w| / qmax`` per channel, ``Z = 0``."""
        amax = abs_rows(w, self.per_channel).to(torch.float32).amax(dim=-1)
        scale = (amax / self.qmax).clamp(min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def forward(self, w: Tensor) -> Tensor:
        return self._fake_quant(w, *self.qparams(w))

    def codes(self, w: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes of ``w`` in ``[-qmax, qmax]``; spec ``affine`` with ``Z = 0``."""
        return self._codes(w, *self.qparams(w))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}"
