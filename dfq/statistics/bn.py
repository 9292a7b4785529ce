"""Per-layer pre-activation statistics that travel beside the GraphModule.

When a BatchNorm is folded into the conv before it, the conv's output distribution is
remembered as N(beta, gamma^2) per channel. Equalization rescales it, high-bias absorption
shifts it, and bias correction and BN-based activation ranges read it. Keys are module names
(never module objects) so the table survives deepcopy.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch


@dataclass(frozen=True)
class BNStats:
    """Per-channel mean and std of a layer's output before its activation."""

    mean: torch.Tensor
    std: torch.Tensor

    def scaled(self, s: torch.Tensor) -> "BNStats":
        """Statistics after dividing output channel i by s[i]."""
        return BNStats(self.mean / s, self.std / s)

    def shifted(self, c: torch.Tensor) -> "BNStats":
        """Statistics after subtracting c[i] from output channel i."""
        return BNStats(self.mean - c, self.std)


Stats = Mapping[str, BNStats]


def freeze(d: dict[str, BNStats]) -> Stats:
    """A read-only view, so a transform can only change statistics by returning new ones."""
    return MappingProxyType(dict(d))
