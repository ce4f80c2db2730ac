"""VGG-small, the CIFAR-10 VGG variant of the quantisation literature (e.g. LQ-Nets, Zhang et al.
2018): ``conv128-conv128-pool-conv256-conv256-pool-conv512-conv512-pool`` (3x3 convs, each with
BatchNorm and ReLU) followed by one linear classifier. The classifier's input size is
``512 * (H // 8) * (W // 8)``, so any ``in_shape`` with H, W >= 8 works.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import conv_bn_relu, pooled_size
from .registry import register_model

WIDTHS = (128, 256, 512)


@register_model("vgg_small")
class VGGSmall(nn.Module):
    """VGG-small: three stages of two 3x3 conv-BN-ReLU layers and a 2x2 max-pool, then a linear."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_shape[0]
        for width in WIDTHS:
            layers += [conv_bn_relu(channels, width), conv_bn_relu(width, width), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        h, w = pooled_size(in_shape, len(WIDTHS), "vgg_small")
        self.classifier = nn.Linear(channels * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))
