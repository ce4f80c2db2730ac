"""Binary (1-bit) quantisers: BNN, XNOR-Net and stochastic BinaryConnect.

All of them produce levels ``{-1, +1}`` (times a scale) with ``sign(0) = +1`` and pass the
gradient straight through the sign inside the hardtanh range (METHODS.md, "Binary")::

    forward  b = sign(x)                 backward  dx = g * 1{|x| <= 1}

The deterministic ones run the fused operator ``lowbit::sign_ste`` (:mod:`lowbit.quant.ops`:
``scale * sign(x)`` and its masked gradient, one pass each); BinaryConnect's random draw uses
:func:`lowbit.quant.functional.straight_through` with the mask :func:`hardtanh_mask`.
:func:`sign_levels` and :func:`binary_spec` also serve DoReFa's 1-bit weights
(:mod:`lowbit.quant.dorefa`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..contract import InputQuant, SignMeanAbsQuant, SignQuant
from . import ops
from .base import Quantizer, QuantSpec, Role, channel_view
from .functional import (
    MAX_SEED,
    SeededRandom,
    check_bool,
    check_int,
    check_role,
    scalar_like,
    straight_through,
)
from .registry import register

__all__ = [
    "BinaryConnect",
    "SignBNN",
    "XNORActivation",
    "XNORWeight",
    "binary_spec",
    "hardtanh_mask",
    "sign_levels",
]


def _plus_minus_one(positive: Tensor, like: Tensor) -> Tensor:
    """``+1`` where ``positive`` holds, else ``-1``, in ``like``'s dtype and on its device."""
    one = scalar_like(like, 1.0)
    return torch.where(positive, one, -one)


def sign_levels(x: Tensor) -> Tensor:
    """``sign(x)`` with ``sign(0) = +1``, as ``{-1., +1.}`` in ``x``'s dtype (no gradient)."""
    return _plus_minus_one(x.detach() >= 0, x)


def hardtanh_mask(x: Tensor) -> Tensor:
    """``1{|x| <= 1}``: where the hardtanh straight-through estimator lets the gradient pass."""
    return x.detach().abs() <= 1


def binary_spec(scale: Tensor, axis: int | None = None) -> QuantSpec:
    """The :class:`QuantSpec` of codes ``{-1, +1}`` with real value ``scale * code``."""
    return QuantSpec(scheme="binary", bits=1, qmin=-1, qmax=1, scale=scale.detach(), axis=axis)


def _sign_codes(x: Tensor) -> Tensor:
    """int8 codes ``sign(x)`` in ``{-1, +1}`` (``sign(0) = +1``)."""
    return sign_levels(x).to(torch.int8)


def _unscaled_sign_codes(x: Tensor) -> tuple[Tensor, QuantSpec]:
    """Codes ``sign(x)`` and the ``binary`` spec with scale 1 (BNN, BinaryConnect)."""
    return _sign_codes(x), binary_spec(scalar_like(x, 1.0))


@register("bnn")
class SignBNN(Quantizer):
    """BNN (Courbariaux/Hubara 2016): ``b = sign(x)`` with ``sign(0) = +1``, no scale.

    Backward is the hardtanh STE ``dx = g * 1{|x| <= 1}``. Serves both roles (``role`` is
    ``"weight"`` or ``"activation"``). ``latent_range = (-1, 1)``: the layer clips latent weights
    to ``[-1, 1]`` after every optimizer step.
    """

    latent_range = (-1.0, 1.0)

    def __init__(self, *, role: Role = "weight") -> None:
        super().__init__()
        self.role = check_role(role)  # type: ignore[misc]  # instance role of a two-role class
        self.bits = 1

    def forward(self, x: Tensor) -> Tensor:
        return ops.sign_ste(x, scalar_like(x, 1.0))

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``sign(x)`` in ``{-1, +1}``, scale 1."""
        return _unscaled_sign_codes(x)

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """``SignQuant()``: activations binarised with ``sign(0) = +1``, scale 1."""
        if self.role != "activation":
            return super().runtime_spec(x)
        return SignQuant()

    def extra_repr(self) -> str:
        return f"bits=1, role={self.role}"


def _filter_means(w: Tensor) -> Tensor:
    """``alpha_c = mean(|W_c|)`` per output channel (dim 0, over all other dims), shape [C_out]."""
    if w.dim() < 1:
        raise ValueError(f"x must have an output-channel dimension, got shape {tuple(w.shape)}")
    return w.abs().reshape(w.shape[0], -1).mean(dim=1)


@register("xnor", roles=("weight",))
class XNORWeight(Quantizer):
    """XNOR-Net weights (Rastegari 2016): ``W ~ alpha * sign(W)``, ``alpha_c = mean(|W_c|)``.

    ``alpha`` is one scale per output channel (dim 0). Gradient (choice documented here):
    ``alpha`` is differentiable, so with ``n`` weights per filter

        ``dL/dW_i = alpha_c * g_i * 1{|W_i| <= 1} + sgn(W_i) / n * sum_j g_j * sign(W_j)``

    (the first term is the hardtanh STE through ``sign``, the second the path through ``alpha``;
    ``sgn(0) = 0`` as in ``torch.abs``'s derivative).
    """

    def __init__(self) -> None:
        super().__init__()
        self.bits = 1

    def forward(self, x: Tensor) -> Tensor:
        alpha = channel_view(_filter_means(x), x.dim(), 0)
        return alpha * ops.sign_ste(x, scalar_like(x, 1.0))

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``sign(W)``; scale ``alpha`` of shape [C_out] along axis 0."""
        return _sign_codes(x), binary_spec(_filter_means(x.detach()), axis=0)


@register("xnor", roles=("activation",))
class XNORActivation(Quantizer):
    """XNOR-Net activations (Rastegari 2016): ``x ~ beta * sign(x)``.

    ``beta = mean(|x|)`` over the channel dimension (dim 1) per sample and position, shape
    ``(N, 1, H, W)`` for 4-D input and ``(N, 1)`` for 2-D input. With ``per_sample=True`` (the
    allowed simplification) ``beta`` is one scalar per sample: the mean over all non-batch dims,
    shape ``(N, 1, ..., 1)``. ``beta`` is a constant in backward (detached), so
    ``dx = beta * g * 1{|x| <= 1}`` (hardtanh STE through ``sign``).
    """

    def __init__(self, *, per_sample: bool = False) -> None:
        super().__init__()
        self.per_sample = check_bool("per_sample", per_sample)
        self.bits = 1

    def _beta(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(
                f"x must have batch and channel dims (N, C, ...), got {tuple(x.shape)}"
            )
        dims = tuple(range(1, x.dim())) if self.per_sample else (1,)
        return x.detach().abs().mean(dim=dims, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return ops.sign_ste(x, self._beta(x))

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """Codes ``sign(x)``; scale ``beta`` broadcastable to ``x`` (``axis=None``)."""
        return _sign_codes(x), binary_spec(self._beta(x))

    def runtime_spec(self, x: Tensor) -> InputQuant | None:
        """``SignMeanAbsQuant(per_sample)``: ``beta`` is computed at run time."""
        return SignMeanAbsQuant(self.per_sample)

    def extra_repr(self) -> str:
        return f"bits=1, per_sample={self.per_sample}"


@register("binaryconnect", roles=("weight",))
class BinaryConnect(SeededRandom, Quantizer):
    """Stochastic BinaryConnect (Courbariaux 2015, via the survey).

    Training mode: ``wb = +1`` with probability ``p = clip((w + 1) / 2, 0, 1)``, else ``-1``
    (drawn as ``u < p`` with ``u ~ U[0, 1)``). Evaluation mode: deterministic ``sign(w)`` with
    ``sign(0) = +1``. Backward: hardtanh STE ``dw = g * 1{|w| <= 1}`` in both modes.

    The random numbers come from the module's own stream (:class:`SeededRandom`): that of a
    :class:`torch.Generator` seeded with ``seed``, created on the first forward on the input's
    device (re-created, and so re-seeded, if the input moves to another device).
    ``latent_range = (-1, 1)``.
    """

    latent_range = (-1.0, 1.0)

    def __init__(self, *, seed: int = 0) -> None:
        super().__init__()
        self.seed = check_int("seed", seed, 0, MAX_SEED)
        self.bits = 1

    def _sample(self, w: Tensor) -> Tensor:
        """``+1`` with probability ``clip((w + 1) / 2, 0, 1)``, else ``-1`` (no gradient)."""
        wd = w.detach()
        p = ((wd + 1) / 2).clamp(0, 1)
        return _plus_minus_one(self.uniform_like(wd) < p, wd)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            self.rng_state(x.device)  # created in eval too, so a compiled training step finds it
            return ops.sign_ste(x, scalar_like(x, 1.0))
        return straight_through(x, self._sample(x), hardtanh_mask(x))

    def codes(self, x: Tensor) -> tuple[Tensor, QuantSpec]:
        """The deterministic (evaluation) codes ``sign(w)``, scale 1.

        They equal :meth:`forward` in eval mode; in training mode forward is a random draw.
        """
        return _unscaled_sign_codes(x)

    def extra_repr(self) -> str:
        return f"bits=1, seed={self.seed}"
