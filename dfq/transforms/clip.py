"""Weight clipping (`--clip_weight`): the original experiments' [-15, 15] after equalization.

Clipping trades a few outlier weights for a finer grid on all the others.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from dfq.config import CLIP_WEIGHT
from dfq.graph.layers import weighted_nodes
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats


def clip_weights(gm: fx.GraphModule, stats: Stats, bound: float = CLIP_WEIGHT) -> Transformed:
    """Return a copy of `gm` with every conv/linear weight clamped to [-bound, bound]."""
    gm = copy.deepcopy(gm)
    info: Records = {}
    for node in weighted_nodes(gm):
        w = gm.get_submodule(node.target).weight
        n = int((w.abs() > bound).sum())
        if n:
            with torch.no_grad():
                w.clamp_(-bound, bound)
            info[node.target] = LayerRecord(clipped_weights=n)
    return Transformed(gm, stats, info)
