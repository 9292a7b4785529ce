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
