"""Quantised layers, the folded Conv+BN(+act) block, and the latent-weight clipping hook."""

from .embedding import QuantEmbedding
from .fused import ConvBnAct, fuse_conv_bn
from .hooks import clip_latent_weights, register_latent_clipping
from .layers import QuantAct, QuantConv2d, QuantLinear, layer_weight_bias, weight_codes

__all__ = [
    "ConvBnAct",
    "QuantAct",
    "QuantConv2d",
    "QuantEmbedding",
    "QuantLinear",
    "clip_latent_weights",
    "fuse_conv_bn",
    "layer_weight_bias",
    "register_latent_clipping",
    "weight_codes",
]
