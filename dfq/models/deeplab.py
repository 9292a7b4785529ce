"""DeepLab-v3+ with a MobileNetV2 backbone, as in jfzhang95/pytorch-deeplab-xception.

Module names follow that repository so its published checkpoints (the `state_dict` entry of
`deeplab-mobilenet.pth.tar`) load with `strict=True`. Its BN layers are SynchronizedBatchNorm2d,
whose state-dict entries are those of `nn.BatchNorm2d`, which we use.

Two details matter for loading and for equal outputs:
- the backbone registers its layers three times (`features`, and the slices
  `low_level_features` = features[0:4] and `high_level_features` = features[4:], which keep their
  original indices), so every backbone tensor appears under three keys in the checkpoint;
- each inverted-residual block zero-pads its *input* by `dilation` and then runs convolutions
  without padding. Because the expansion 1x1 conv + BN + ReLU6 sees the padded border, the
  border is not zero by the time it reaches the depthwise conv: this is not equivalent to
  padding inside the depthwise conv, so the explicit pad is kept.

The forward returns raw logits upsampled to the input size (fx-traceable, no post-processing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfq.errors import DfqError
from dfq.models.blocks import MOBILENETV2_STAGES, inverted_residual_layers
from dfq.models.registry import InputConfig, register

_ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}


class InvertedResidual(nn.Module):
    """MobileNetV2 block with the input padded up front (jfzhang95's `fixed_padding`)."""

    def __init__(self, inp: int, oup: int, stride: int, dilation: int, expand_ratio: int):
        super().__init__()
        self.use_res_connect = stride == 1 and inp == oup
        # Symmetric for a 3x3 kernel: effective size 2*dilation+1 needs `dilation` on each side.
        self.pad = nn.ZeroPad2d(dilation)
        self.conv = inverted_residual_layers(
            inp, oup, stride, expand_ratio, padding=0, dilation=dilation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.pad(x))
        return x + out if self.use_res_connect else out


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 without its last 1x1 conv; dilated after the stride reaches `output_stride`."""

    def __init__(self, output_stride: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        ]
        # jfzhang95's rule, kept as is: once the stride has reached output_stride, a stage's
        # stride becomes 1 and it uses the dilation accumulated by the stages before it.
        current_stride, rate, inp = 2, 1, 32
        for t, c, n, s in MOBILENETV2_STAGES:
            if current_stride == output_stride:
                stride, dilation = 1, rate
                rate *= s
            else:
                stride, dilation = s, 1
                current_stride *= s
            for i in range(n):
                layers.append(InvertedResidual(inp, c, stride if i == 0 else 1, dilation, t))
                inp = c
        self.features = nn.Sequential(*layers)
        # Aliases registered as in the original (they add duplicate keys to the state dict).
        self.low_level_features = self.features[0:4]
        self.high_level_features = self.features[4:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low_level_features(x)
        return self.high_level_features(low), low


class _ASPPModule(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int, dilation: int):
        super().__init__()
        padding = 0 if kernel_size == 1 else dilation
        self.atrous_conv = nn.Conv2d(
            inplanes, planes, kernel_size, 1, padding, dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    def __init__(self, inplanes: int, output_stride: int):
        super().__init__()
        r1, r2, r3 = _ASPP_RATES[output_stride]
        self.aspp1 = _ASPPModule(inplanes, 256, 1, 1)
        self.aspp2 = _ASPPModule(inplanes, 256, 3, r1)
        self.aspp3 = _ASPPModule(inplanes, 256, 3, r2)
        self.aspp4 = _ASPPModule(inplanes, 256, 3, r3)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(inplanes, 256, 1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
        )
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(256)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2, x3, x4 = self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x)
        x5 = F.interpolate(
            self.global_avg_pool(x), size=x4.shape[2:], mode="bilinear", align_corners=True
        )
        x = torch.cat((x1, x2, x3, x4, x5), dim=1)
        return self.relu(self.bn1(self.conv1(x)))


class Decoder(nn.Module):
    def __init__(self, num_classes: int, low_level_inplanes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU()
        self.last_conv = nn.Sequential(
            nn.Conv2d(304, 256, 3, 1, 1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, 1, 1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.relu(self.bn1(self.conv1(low)))
        x = F.interpolate(x, size=low.shape[2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat((x, low), dim=1))


class DeepLabV3Plus(nn.Module):
    def __init__(self, num_classes: int = 21, output_stride: int = 16):
        super().__init__()
        if output_stride not in _ASPP_RATES:
            raise DfqError(
                f"DeepLab output stride {output_stride} is not supported.", "use 8 or 16"
            )
        self.backbone = MobileNetV2Backbone(output_stride)
        self.aspp = ASPP(320, output_stride)
        self.decoder = Decoder(num_classes, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high, low = self.backbone(x)
        out = self.decoder(self.aspp(high), low)
        return F.interpolate(out, size=x.shape[2:], mode="bilinear", align_corners=True)


@register("deeplabv3plus_mobilenetv2", InputConfig(size=(3, 513, 513), resize=0, crop=0))
def deeplabv3plus_mobilenetv2(num_classes: int = 21, output_stride: int = 16) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, output_stride)
