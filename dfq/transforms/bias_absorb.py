"""High-bias absorption (DFQ paper, section 4.1.1).

After equalization some channels carry large positive biases that widen the activation
range. For a channel with pre-activation N(beta, gamma^2), c = max(0, beta - n*gamma) almost
always passes a following ReLU unclipped, so ReLU(x) - c = ReLU(x - c): subtract c from the
first layer's bias and add W2 @ c to the second's. Exact but for the rare x < c.

A second layer that zero-pads would see 0 instead of -c at its borders: on MobileNet's 7x7
maps that error is larger than the gain, so such pairs are left alone (and reported).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.config import ABSORB_STD
from dfq.graph.channels import ensure_bias, input_contribution
from dfq.graph.layers import find_pairs
from dfq.graph.modules import ChannelMin
from dfq.graph.ops import is_shape_query, pads_input
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats, freeze


def _zero_padding_between(gm: fx.GraphModule, first: str, second: str) -> str | None:
    """A zero-padding op on the path first -> second (its zeros do not take the shift c, so the
    second layer's +W2 c would be wrong at the borders), by node name; None if there is none."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == first)
    while len(users := [u for u in node.users if not is_shape_query(u)]) == 1:
        node = users[0]
        if node.op == "call_module" and node.target == second:
            return None
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            pads = isinstance(m, nn.ZeroPad2d) or (
                isinstance(m, nn.AvgPool2d) and m.count_include_pad and m.padding not in (0, (0, 0))
            )
        else:
            pads = node.op == "call_function" and node.target is F.pad
        if pads:
            return node.name
    return None


def absorbable_shift(
    mean: torch.Tensor, std: torch.Tensor, n_std: float = ABSORB_STD
) -> torch.Tensor:
    return torch.clamp(mean - n_std * std, min=0)


def absorb_high_bias(gm: fx.GraphModule, stats: Stats, n_std: float = ABSORB_STD) -> Transformed:
    """Return a copy of `gm` with high biases moved forward across ReLU pairs."""
    gm = copy.deepcopy(gm)
    pairs, _ = find_pairs(gm)
    new_stats = dict(stats)
    info: Records = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in pairs:
        clips = [
            gm.get_submodule(nodes[c].target) if nodes[c].op == "call_module" else None
            for c in p.clips
        ]
        if p.first not in new_stats or not all(isinstance(c, ChannelMin) for c in clips):
            continue  # a plain ReLU6 cannot take the shift (split it by equalizing first)
        st = new_stats[p.first]
        c = absorbable_shift(st.mean, st.std, n_std)
        if not bool((c > 0).any()):
            continue
        first, second = gm.get_submodule(p.first), gm.get_submodule(p.second)
        if pads_input(second):
            info[p.first] = LayerRecord(
                absorption_note=f"not absorbed: {p.second} zero-pads its input"
            )
            continue
        if (pad := _zero_padding_between(gm, p.first, p.second)) is not None:
            info[p.first] = LayerRecord(
                absorption_note=f"not absorbed: {pad} zero-pads between it and {p.second}"
            )
            continue
        with torch.no_grad():
            ensure_bias(first).sub_(c)
            ensure_bias(second).add_(input_contribution(second, c))
        for clip in clips:  # min(ReLU(x), hi) - c = min(ReLU(x - c), hi - c) for x >= c
            clip.hi.sub_(c)
        new_stats[p.first] = st.shifted(c)
        info[p.first] = LayerRecord(
            absorbed_channels=int((c > 0).sum()), absorbed_max=float(c.max())
        )
    return Transformed(gm, freeze(new_stats), info)
