"""Multi-layer perceptron: ``flatten -> [linear-BN-ReLU] x len(hidden) -> linear``."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from .layers import linear_bn_relu
from .registry import register_model


@register_model("mlp")
class MLP(nn.Module):
    """Fully-connected net on ``C * H * W`` inputs, hidden widths ``hidden`` (default 256-256)."""

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, int, int],
        hidden: Sequence[int] = (256, 256),
    ) -> None:
        super().__init__()
        widths = tuple(hidden) if isinstance(hidden, (tuple, list)) else ()
        if not widths or not all(isinstance(h, int) and h > 0 for h in widths):
            raise ValueError(
                f"hidden must be a non-empty sequence of positive ints, got {hidden!r}"
            )
        self.flatten = nn.Flatten()
        sizes = (math.prod(in_shape), *widths)
        self.hidden = nn.Sequential(
            *(linear_bn_relu(a, b) for a, b in zip(sizes[:-1], widths, strict=True))
        )
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.hidden(self.flatten(x)))
