"""Small nets with one op kind each (convs, depthwise, pool + linear, residual adds) and the
helper that compares a runtime with its simulation on them: shared by the runtime tests."""

from __future__ import annotations

import torch
from conftest import randomize_bn
from torch import nn

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.runtimes import profile


def _cbr(i: int, o: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(i, o, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU()
    )


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _cbr(3, 16), _cbr(16, 16), nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


class Depthwise(Convs):
    def __init__(self):
        super().__init__()
        self.b = _cbr(16, 16, groups=16)


class PoolLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = _cbr(3, 16), _cbr(16, 32, stride=2), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.b(self.a(x)), 1), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 16)
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y + self.b(y))


class ChainOfResiduals(nn.Module):
    """MobileNetV2's pattern: y + block(y), the block ending in a convolution that does not read
    y: OpenVINO fuses each add into that convolution and drops its output quantizer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.b, self.e = self._block(), self._block()
        self.c = nn.Conv2d(16, 8, 1)

    @staticmethod
    def _block() -> nn.Sequential:
        return nn.Sequential(_cbr(16, 32), nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)
        return self.c(y + self.e(y))


class TwoBranches(nn.Module):
    """ResNet's downsampling add, relu(conv(y) + conv(y)): the first operand is fused."""

    def __init__(self):
        super().__init__()
        self.a = _cbr(3, 16)
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.d = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16))
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.relu(self.b(y) + self.d(y)))


class TwoHeads(nn.Module):
    """An SSD's shape: one trunk, two heads whose maps are permuted and flattened into per-anchor
    scores (N, P, 3) and boxes (N, P, 4), returned as a tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(3, 16), _cbr(16, 16, stride=2)
        self.scores, self.boxes = nn.Conv2d(16, 2 * 3, 3, 1, 1), nn.Conv2d(16, 2 * 4, 3, 1, 1)

    def forward(self, x):
        y = self.b(self.a(x))
        n = x.shape[0]
        scores = self.scores(y).permute(0, 2, 3, 1).reshape(n, -1, 3)
        return scores, self.boxes(y).permute(0, 2, 3, 1).reshape(n, -1, 4)


def sim_and_runtime(net: nn.Module, target: str, tmp_path, hw: int = 16, **fields):
    """`net` (BN randomized) quantized for `target` (and PipelineConfig `fields`), exported to
    tmp_path/m.*, and the simulation's and the runtime's outputs on 64 images of hw x hw."""
    torch.manual_seed(1)
    model = randomize_bn(net).eval()
    config = PipelineConfig(quant=QuantConfig(target=target), input_size=(3, hw, hw), **fields)
    result = quantize_model(model, config)
    runtime = profile(target)
    files = runtime.export(result.model, tmp_path / "m", (1, 3, hw, hw))
    x = torch.randn(64, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return result, files, result.model(x), runtime.runner(files, threads=1)(x)


class HiddenLinear(nn.Module):
    """A linear layer whose output is quantized (MobileNetV3's classifier: Linear, Hardswish,
    Linear), read through a flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.fc1, self.act, self.fc2 = (
            _cbr(3, 16),
            nn.Linear(16, 32),
            nn.Hardswish(),
            nn.Linear(32, 5),
        )

    def forward(self, x):
        pooled = nn.functional.adaptive_avg_pool2d(self.a(x), 1)
        return self.fc2(self.act(self.fc1(torch.flatten(pooled, 1))))


class SqueezeExcite(nn.Module):
    """MobileNetV3's gate on a Hardswish output (a zero point inside the grid): pool, 1x1 convs,
    Hardsigmoid, product; with `silu`, EfficientNet's (SiLU, sigmoid)."""

    def __init__(self, c: int = 64, silu: bool = False):
        from torchvision.ops import SqueezeExcitation

        super().__init__()
        act, gate = (nn.SiLU, nn.Sigmoid) if silu else (nn.Hardswish, nn.Hardsigmoid)
        self.a = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.BatchNorm2d(c), act())
        inner = nn.SiLU if silu else nn.ReLU
        self.se = SqueezeExcitation(c, c // 4, activation=inner, scale_activation=gate)
        self.c = nn.Conv2d(c, 8, 1)

    def forward(self, x):
        return self.c(self.se(self.a(x)))


class SiluSqueezeExcite(SqueezeExcite):
    def __init__(self):
        super().__init__(silu=True)
