"""Building blocks shared by dfq's own architectures."""

from __future__ import annotations

import torch
from torch import nn

# MobileNetV2's inverted-residual stages: expansion t, channels c, repeats n, first stride s.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def inverted_residual_layers(
    inp: int, oup: int, stride: int, expand_ratio: float, padding: int, dilation: int = 1
) -> nn.Sequential:
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


def flatten_head(t: torch.Tensor, per_anchor: int) -> torch.Tensor:
    """An SSD head's (N, A*K, H, W) output as (N, H*W*A, K): row, column, then anchor (the
    priors' order)."""
    return t.permute(0, 2, 3, 1).flatten(1).unflatten(1, (-1, per_anchor))
