"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", §4.2.

``resnet{6n+2}``: a 3x3 conv with 16 channels, then 3 stages of ``n`` basic blocks with 16, 32
and 64 channels (the first block of stages 2 and 3 halves H and W with stride 2), global average
pooling and a linear classifier. This is the ResNet-20/32/44/56 family that TTQ (Zhu et al.,
2017) quantises. Shortcuts are the parameter-free *option A*: identity, or, where the shape
changes, stride-2 subsampling with the extra channels zero-padded.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_model

STAGE_CHANNELS = (16, 32, 64)


class ShortcutA(nn.Module):
    """He et al. option A shortcut: ``x[:, :, ::s, ::s]`` plus ``C_out - C_in`` zero channels.

    Has no parameters, so it adds nothing to quantise; a module (not inline code) so that the
    block stays ``torch.fx`` traceable and readable.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) must be >= in_channels ({in_channels}) "
                "for an option-A shortcut"
            )
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra_channels}"


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``, 3x3 convs (He et al., Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        reshape = stride != 1 or in_channels != out_channels
        self.shortcut = ShortcutA(in_channels, out_channels, stride) if reshape else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet of depth ``6n + 2`` for small images (any H, W >= 1; designed for 32x32)."""

    def __init__(self, depth: int, num_classes: int, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_shape[0], STAGE_CHANNELS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_CHANNELS[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(STAGE_CHANNELS[0], STAGE_CHANNELS[0], blocks, stride=1)
        self.layer2 = _stage(STAGE_CHANNELS[0], STAGE_CHANNELS[1], blocks, stride=2)
        self.layer3 = _stage(STAGE_CHANNELS[1], STAGE_CHANNELS[2], blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(STAGE_CHANNELS[2], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` basic blocks; the first one changes the channels and applies ``stride``."""
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


for _depth in (20, 32, 44, 56):
    register_model(f"resnet{_depth}")(partial(CifarResNet, _depth))
