"""Building blocks shared by the model zoo, and the weight initialisation.

Every block is made of ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm*`` / ``nn.ReLU`` *modules*
(one ReLU instance per use), so that :func:`lowbit.quantize` can find and swap layers by name and
fold each BatchNorm into the conv before it.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv2d(k, stride 1, padding k//2, no bias) -> BatchNorm2d -> ReLU``: keeps H and W."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def linear_bn_relu(in_features: int, out_features: int) -> nn.Sequential:
    """``Linear(no bias) -> BatchNorm1d -> ReLU``: a hidden fully-connected layer."""
    return nn.Sequential(
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        nn.ReLU(inplace=True),
    )


def pooled_size(in_shape: tuple[int, int, int], pools: int, model: str) -> tuple[int, int]:
    """``(H // 2**pools, W // 2**pools)``: the map left after ``pools`` 2x2 max-pools.

    A ValueError names ``in_shape`` when the input is too small for the model.
    """
    _, h, w = in_shape
    factor = 2**pools
    if h < factor or w < factor:
        raise ValueError(
            f"in_shape {in_shape} is too small for {model}: H and W must be >= {factor} "
            f"({pools} 2x2 poolings)"
        )
    return h // factor, w // factor


def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Standard initialisation, drawn from ``generator`` (the global RNG when None).

    Convs: He et al. (2015) ``kaiming_normal_`` with ``mode='fan_out'`` and the ReLU gain,
    ``W ~ N(0, 2 / (k_h k_w C_out))``. Linear layers: ``W ~ N(0, 0.01^2)``. Biases are zero;
    BatchNorm starts at ``gamma = 1, beta = 0``. A model with its own ``init_weights(generator)``
    method (the LLaMA family) is initialised by it instead.
    """
    own = getattr(model, "init_weights", None)
    if callable(own):
        own(generator)
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(
                m.weight, mode="fan_out", nonlinearity="relu", generator=generator
            )
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01, generator=generator)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
