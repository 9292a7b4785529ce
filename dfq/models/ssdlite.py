"""MobileNetV2 SSD-Lite (width 1.0) of qfgaohao/pytorch-ssd, state-dict compatible.

Module names follow `vision/ssd/mobilenet_v2_ssd_lite.py` there (`base_net.N...`, `extras`,
`classification_headers`, `regression_headers`), so its published checkpoint
(`mb2-ssd-lite-mp-0_686.pth`, a plain state dict) loads with `strict=True`.

Feature sources for a 300x300 input, as that file's `GraphPath(14, 'conv', 3)` and `19`:
the 576-channel expansion inside block 14 (19x19), the 1280-channel last conv (10x10), then
four extra inverted residuals (5x5, 3x3, 2x2, 1x1); 6 anchors per cell, 3000 in all.

The forward returns raw `(confidences, locations)`, shaped (N, priors, classes) and
(N, priors, 4): no softmax, no decoding, so the body stays fx-traceable and quantizable.
Priors, decoding and NMS live in `dfq.tasks.detection`.
"""

from __future__ import annotations

import torch
from torch import nn

from dfq.models.blocks import MOBILENETV2_STAGES, flatten_head, inverted_residual_layers
from dfq.models.registry import InputConfig, register

# Extra feature layers: (in, out, expand_ratio), each with stride 2.
_EXTRAS = ((1280, 512, 0.2), (512, 256, 0.25), (256, 256, 0.5), (256, 64, 0.25))
_HEAD_INPUTS = (576, 1280, 512, 256, 256, 64)
_ANCHORS = 6


def _conv_bn_relu6(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block; `conv` is one flat Sequential (pw, bn, relu6, dw, bn, relu6, pw, bn)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: float):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = inverted_residual_layers(inp, oup, stride, expand_ratio, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _separable_head(inp: int, oup: int) -> nn.Sequential:
    """qfgaohao's SeperableConv2d: depthwise 3x3 (with bias) + BN + ReLU6 + pointwise 1x1."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, 1, 1, groups=inp),
        nn.BatchNorm2d(inp),
        nn.ReLU6(),
        nn.Conv2d(inp, oup, 1),
    )


def _mobilenetv2_features() -> nn.Sequential:
    layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
    inp = 32
    for t, c, n, s in MOBILENETV2_STAGES:
        for i in range(n):
            layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
            inp = c
    layers.append(_conv_bn_relu6(inp, 1280, 1, 1))
    return nn.Sequential(*layers)


def _heads(out_per_anchor: int) -> nn.ModuleList:
    *separable, last = _HEAD_INPUTS
    return nn.ModuleList(
        [_separable_head(c, _ANCHORS * out_per_anchor) for c in separable]
        + [nn.Conv2d(last, _ANCHORS * out_per_anchor, 1)]
    )


class SSDLite(nn.Module):
    def __init__(self, num_classes: int = 21):
        super().__init__()
        self.num_classes = num_classes
        self.base_net = _mobilenetv2_features()
        self.extras = nn.ModuleList([InvertedResidual(i, o, 2, e) for i, o, e in _EXTRAS])
        self.classification_headers = _heads(num_classes)
        self.regression_headers = _heads(4)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        for layer in self.base_net[:14]:
            x = layer(x)
        # Block 14 (stride 2, no residual) is split after its expansion: that output is a source.
        block14 = self.base_net[14].conv
        for layer in block14[:3]:
            x = layer(x)
        sources = [x]
        for layer in block14[3:]:
            x = layer(x)
        for layer in self.base_net[15:]:
            x = layer(x)
        sources.append(x)
        for layer in self.extras:
            x = layer(x)
            sources.append(x)
        return sources

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        confidences, locations = [], []
        for src, cls_head, reg_head in zip(
            self._features(x), self.classification_headers, self.regression_headers
        ):
            confidences.append(flatten_head(cls_head(src), self.num_classes))
            locations.append(flatten_head(reg_head(src), 4))
        return torch.cat(confidences, 1), torch.cat(locations, 1)


# qfgaohao's (x - 127) / 128 on 0..255 pixels
@register(
    "ssdlite_mobilenetv2",
    InputConfig(
        size=(3, 300, 300), mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3, resize=0, crop=0
    ),
)
def ssdlite_mobilenetv2(num_classes: int = 21) -> SSDLite:
    return SSDLite(num_classes)
