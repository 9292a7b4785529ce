"""Shared fixtures: small models with randomised BatchNorm (a fresh BN is nearly the identity
and proves nothing), and the real artefacts of ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial affine parameters and running statistics (in place)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.2)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model.eval()


class SmallNet(nn.Module):
    """conv-BN-ReLU6 -> depthwise-BN-ReLU6 -> conv-BN (+ residual) -> pool -> linear."""

    def __init__(self, relu=nn.ReLU6):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), relu()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), relu()
        )
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), relu())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.pw(self.dw(x))
        x = self.head(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class CatNet(nn.Module):
    """Two branches concatenated (one upsampled, one reading the input twice via a fan-out),
    then a conv and a linear head: channel-sliced regions with every kind of member."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), act())
        self.b = nn.Sequential(nn.Conv2d(8, 10, 3, stride=2, padding=1), nn.BatchNorm2d(10), act())
        self.c = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.fuse = nn.Sequential(nn.Conv2d(20, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        up = F.interpolate(self.b(x), size=x.shape[2:], mode="bilinear", align_corners=False)
        y = torch.cat([self.a(x), up, self.c(x)], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.fuse(y), 1), 1))


@pytest.fixture
def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallNet())


def shared(name: str) -> Path:
    p = DATA / name
    if not p.exists():
        pytest.skip(f"{p} not present")
    return p


def resnet20_args() -> list[str]:
    """The CLI switches that load the real CIFAR ResNet-20 of ../shared/data."""
    return ["--arch", "cifar_resnet20", "--weights", str(shared("cifar10_resnet20-12fca82f.th"))]


def load_cifar_resnet(depth: int = 20) -> nn.Module:
    from dfq.models import build
    from dfq.models.checkpoints import load_weights

    name = {20: "cifar10_resnet20-12fca82f.th", 56: "cifar10_resnet56-4bfd9763.th"}[depth]
    return load_weights(build(f"cifar_resnet{depth}"), str(shared(name))).eval()
