"""Quantised drop-in layers: ``QuantConv2d``, ``QuantLinear`` and ``QuantAct``.

A quantised layer holds the float (latent) weight of the layer it replaces, plus two optional
quantiser modules: ``weight_quant`` applied to the weight and ``input_quant`` applied to the
layer's input. Quantising the *inputs* of every matrix-multiplying layer is the convention of
LSQ, BNN, XNOR-Net and DoReFa; for post-ReLU inputs it equals quantising the previous
activation (Jacob et al.). ``None`` keeps that side in float.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quant.base import Quantizer, QuantSpec
from .fused import ConvBnAct


class _QuantMixin:
    """Shared behaviour of quantised layers: the fake-quantised weight and input."""

    weight: nn.Parameter
    weight_quant: Quantizer | None
    input_quant: Quantizer | None

    def quantized_weight(self) -> Tensor:
        """The weight as the forward pass uses it (fake-quantised, or float if no quantiser)."""
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def quantize_input(self, x: Tensor) -> Tensor:
        return x if self.input_quant is None else self.input_quant(x)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and input pass through quantisers."""

    def __init__(
        self,
        *args: object,
        weight_quant: Quantizer | None = None,
        input_quant: Quantizer | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    @classmethod
    def from_float(
        cls,
        conv: nn.Conv2d,
        weight_quant: Quantizer | None = None,
        input_quant: Quantizer | None = None,
    ) -> QuantConv2d:
        """Wrap ``conv``; its weight and bias Parameters are shared, not copied."""
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            weight_quant=weight_quant,
            input_quant=input_quant,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.weight = conv.weight
        q.bias = conv.bias
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight and input pass through quantisers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quant: Quantizer | None = None,
        input_quant: Quantizer | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self.weight_quant = weight_quant
        self.input_quant = input_quant

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        weight_quant: Quantizer | None = None,
        input_quant: Quantizer | None = None,
    ) -> QuantLinear:
        """Wrap ``linear``; its weight and bias Parameters are shared, not copied."""
        q = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            weight_quant=weight_quant,
            input_quant=input_quant,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q.weight = linear.weight
        q.bias = linear.bias
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantAct(nn.Module):
    """A standalone activation quantiser, to place anywhere in a model (e.g. after a ReLU)."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer(x)


def layer_weight_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The float weight and bias that a layer's weight quantiser sees (folded for ConvBnAct;
    None for a layer without a bias, an embedding included)."""
    if isinstance(module, ConvBnAct):
        return module.folded_weight_bias()
    return module.weight, getattr(module, "bias", None)


@torch.no_grad()
def weight_codes(module: nn.Module) -> tuple[Tensor, QuantSpec] | None:
    """Integer codes and spec of a layer's weight, in evaluation mode (deterministic).

    Runs the weight quantiser once first, which initialises lazily set scales (TTQ's Wp/Wn,
    LSQ's step) from the weight. None for a layer without a weight quantiser.
    """
    quant: Quantizer | None = getattr(module, "weight_quant", None)
    if quant is None:
        return None
    weight, _ = layer_weight_bias(module)
    was_training = quant.training
    quant.eval()
    try:
        quant(weight)
        return quant.codes(weight)
    finally:
        quant.train(was_training)
