"""Building blocks shared by dfq's own architectures."""
from __future__ import annotations

from torch import nn


def inverted_residual_layers(inp: int, oup: int, stride: int, expand_ratio: float, padding: int,
                             dilation: int = 1) -> nn.Sequential:
    """MobileNetV2's expand 1x1 -> depthwise 3x3 -> project 1x1 (BN after each, ReLU6 after the
    first two), keyed conv.0, conv.1, ... as both public checkpoints store it."""
    hidden = round(inp * expand_ratio)
    layers: list[nn.Module] = []
    if expand_ratio != 1:
        layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
    layers += [
        nn.Conv2d(hidden, hidden, 3, stride, padding, dilation, groups=hidden, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(),
        nn.Conv2d(hidden, oup, 1, bias=False),
        nn.BatchNorm2d(oup),
    ]
    return nn.Sequential(*layers)
