"""CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10 (state-dict compatible).

3 stages of BasicBlocks (16/32/64 channels); "option A" shortcuts: stride-2 subsampling
zero-padded in channels, with no parameters; global average pool; linear 64 -> 10.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.models.registry import InputConfig, register

# CIFAR-10 at 32x32, no resize or crop, ImageNet normalisation (how these models were trained)
CIFAR = InputConfig(size=(3, 32, 32), resize=0, crop=0)


class PadShortcut(nn.Module):
    """Option-A shortcut: x[:, :, ::2, ::2] zero-padded to `planes` channels (no weights)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = PadShortcut(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register("cifar_resnet20", CIFAR)
def cifar_resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(3, num_classes)


@register("cifar_resnet56", CIFAR)
def cifar_resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(9, num_classes)
