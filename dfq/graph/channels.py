"""How a weighted layer mixes its input channels, for the per-channel maths of every pass.

On an input that is constant over space (a per-channel mean, a bias shift) a conv acts as a
dense (out, in) matrix: its kernel summed over space, block-diagonal over groups. A Linear
after `flatten` sees each channel repeated `features_per_channel` times.
"""

from __future__ import annotations

import torch
from torch import nn


def channel_matrix(m: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The (out_channels, in_channels) matrix of `m` (or of `weight` in its place)."""
    w = m.weight if weight is None else weight
    if isinstance(m, nn.Linear):
        return w
    k = w.flatten(2).sum(2)
    if m.groups == 1:
        return k
    g = m.groups
    return torch.block_diag(*k.reshape(g, m.out_channels // g, m.in_channels // g))


def features_per_channel(m: nn.Module, channels: int) -> int:
    """How many input features of `m` each of `channels` producer channels feeds (flatten)."""
    n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
    if n_in % channels:
        return 0
    return n_in // channels


def to_features(m: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """Expand a per-channel vector to `m`'s input features (identity unless flattened)."""
    k = features_per_channel(m, v.numel())
    return v if k == 1 else v.repeat_interleave(k)


def input_contribution(
    m: nn.Module, v: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The output (per output channel) that a per-channel constant input `v` adds to `m`."""
    M = channel_matrix(m, weight)
    return M @ to_features(m, v).to(M.dtype)


def ensure_bias(m: nn.Module) -> torch.Tensor:
    """Give `m` a zero bias if it has none (folding, absorption and correction write to it)."""
    if m.bias is None:
        n = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        m.bias = nn.Parameter(torch.zeros(n, dtype=m.weight.dtype, device=m.weight.device))
    return m.bias
