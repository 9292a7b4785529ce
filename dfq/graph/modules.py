"""Small modules that dfq's transforms insert into graphs."""

from __future__ import annotations

import torch
from torch import nn


class ChannelMin(nn.Module):
    """y = min(x, hi[c]): the per-channel upper clip that exact ReLU6 equalization leaves.

    Equalizing conv1 -> ReLU6 -> conv2 with scales s turns ReLU6 into
    ReLU6(s x) / s = min(ReLU(x), 6 / s): a ReLU (scale-invariant) followed by this clip,
    whose bounds equalization keeps dividing by s. The float function never changes.
    """

    def __init__(self, hi: torch.Tensor):
        super().__init__()
        self.register_buffer("hi", hi.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.hi.reshape(1, -1, *([1] * (x.dim() - 2))).to(x.dtype))

    def extra_repr(self) -> str:
        lo, hi = float(self.hi.min()), float(self.hi.max())
        return f"channels={self.hi.numel()}, hi=[{lo:.3g}, {hi:.3g}]"


def _ncnn_mean(x: torch.Tensor) -> torch.Tensor:
    """ncnn's global average Pooling on x86. Channels packed 4 or 8 to a vector (C % 4 == 0): one
    lane per channel, the pixels summed in raster order. Unpacked (C % 4 != 0): partial sums of 4
    consecutive pixels, reduced pairwise ((0 + 2) + (1 + 3)), then the leftover pixels in order."""
    flat = x.flatten(2).float()
    n = flat.shape[2]
    if x.shape[1] % 4 == 0:
        acc = torch.zeros(flat.shape[:2], device=x.device)
        for k in range(n):
            acc = acc + flat[:, :, k]
    else:
        full = n // 4 * 4
        lanes = torch.zeros(*flat.shape[:2], 4, device=x.device)
        for k in range(0, full, 4):
            lanes = lanes + flat[:, :, k : k + 4]
        acc = (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])
        for k in range(full, n):
            acc = acc + flat[:, :, k]
    inv_n = torch.tensor(1.0 / n, dtype=torch.float32, device=x.device)
    return (acc * inv_n)[:, :, None, None].to(x.dtype)


class GlobalAvgPool(nn.Module):
    """The spatial mean over (H, W), keeping them as 1 x 1; with `requant` set, computed as
    onnxruntime's QLinearGlobalAveragePool does (MlasQLinearGlobalAveragePoolNchw): the exact
    int32 sum of the input's integers times the float32 s_in / (s_out * float(H * W)), clamped
    to the grid and rounded half to even. A float mean then a quantizer rounds ties the other
    way in a few outputs per thousand (tests/test_low_bit_export.py)."""

    requant = None  # a dfq.quant.modules.Requant: set by the onnxruntime profile
    # XNNPACK's qs8 mean (measured): its multiplier is s_in / (s_out * N) rounded once to
    # float32 (onnxruntime's rounds at each float32 step, 1/36 -> 0.02777777612 not ...778),
    # and it rounds the value with the output zero point added, so its ties go to the even
    # integer of the grid, onnxruntime's to the even offset from the zero point
    xnnpack_mean = False
    # ncnn's float Pooling (measured on x86): its float32 sum order, times float32(1 / (H W));
    # torch's vectorised mean differs in the last bit at 730 of MobileNetV2's 1280 channels, and
    # one of them, 1e-6 from a rounding tie of the next layer's quantizer, moved an image's logits
    ncnn_mean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.requant
        if r is None:
            return _ncnn_mean(x) if self.ncnn_mean else x.mean((2, 3), keepdim=True)
        acc = torch.round(x.double() / r.in_scale.double()).sum((2, 3), keepdim=True)  # exact
        n = float(x.shape[2] * x.shape[3])
        zp = float(r.out_zero_point)
        if self.xnnpack_mean:
            m = (r.in_scale.float().double() / (r.out_scale.float().double() * n)).float()
        else:  # float32 at each step, as onnxruntime
            m = r.in_scale.float() / (r.out_scale.float() * torch.tensor(n, dtype=torch.float32))
        y = acc.float() * m.to(acc.device)
        if self.xnnpack_mean:
            q = torch.round((y + zp).clamp(r.qmin, r.qmax)) - zp
        else:
            q = torch.round(y.clamp(r.qmin - zp, r.qmax - zp))
        return (q * r.out_scale.float().to(acc.device)).to(x.dtype)
