"""The explicit ReLU6 -> ReLU policy of the DFQ paper (`--relu`), never applied silently.

ReLU6 is not scale-invariant, so plain cross-layer equalization cannot look through it;
swapping it for ReLU lets it, at the price of a (usually small) change of the float model.
"""

from __future__ import annotations

import copy
import logging

import torch.nn.functional as F
from torch import fx, nn

from dfq.graph.ops import RELU6, activation_of
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats

log = logging.getLogger("dfq")


def replace_relu6(gm: fx.GraphModule, stats: Stats) -> Transformed:
    """Return a copy of `gm` in which every ReLU6 (module, function or hardtanh(0, 6)) is a ReLU."""
    gm = copy.deepcopy(gm)
    info: Records = {}
    for node in gm.graph.nodes:
        act = activation_of(gm, node)
        if (
            act is None
            or act.kind not in ("relu6", "hardtanh")
            or (act.lo, act.hi) != (RELU6.lo, RELU6.hi)
        ):
            continue
        if node.op == "call_module":
            parent, _, attr = node.target.rpartition(".")
            setattr(gm.get_submodule(parent), attr, nn.ReLU())
        else:
            node.target, node.op = F.relu, "call_function"
            node.args, node.kwargs = node.args[:1], {}
        info[node.name] = LayerRecord(relu6="replaced by ReLU")
    gm.recompile()
    if info:
        log.info("replaced %d ReLU6 by ReLU (--relu)", len(info))
    return Transformed(gm, stats, info)
