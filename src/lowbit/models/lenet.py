"""LeNet-5-style CNN (LeCun et al., 1998), modernised: two ``conv5x5(padding 2)-BN-ReLU-maxpool2``
blocks, a hidden fully-connected layer with BN and ReLU, and a linear classifier. The padding keeps
the spatial size through each conv, so 28x28 (MNIST) and 8x8 (scikit-learn digits) both work; the
flatten size ``channels[1] * (H // 4) * (W // 4)`` is computed from ``in_shape``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .layers import conv_bn_relu, linear_bn_relu, pooled_size
from .registry import register_model


@register_model("lenet5")
class LeNet5(nn.Module):
    """``[conv-BN-ReLU-pool] x 2 -> linear-BN-ReLU (hidden) -> linear (classifier)``."""

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int],
        channels: Sequence[int] = (32, 64),
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be two positive ints, got {channels!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        c1, c2 = channels
        self.features = nn.Sequential(
            conv_bn_relu(in_shape[0], c1, 5),
            nn.MaxPool2d(2),
            conv_bn_relu(c1, c2, 5),
            nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        h, w = pooled_size(in_shape, 2, "lenet5")
        self.fc = linear_bn_relu(c2 * h * w, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.fc(self.flatten(self.features(x))))
