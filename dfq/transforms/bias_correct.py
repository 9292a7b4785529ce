"""Data-free bias correction (DFQ paper, section 4.2).

Quantizing W to Q(W) shifts each output's mean by (Q(W) - W) E[x]. E[x] of every layer input
comes from the BN statistics of the producing layers (clipped-normal means through ReLU and
ReLU6, sums across residual adds: see dfq.moments), so the shift can be subtracted from
the bias without data. Works for any weight bit width.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from dfq.graph.channels import ensure_bias, input_contribution
from dfq.graph.ops import weighted_module
from dfq.moments import Moments
from dfq.quant.modules import QuantizedLayer
from dfq.stats import Stats
from dfq.transforms import Transformed


def correct_bias(gm_q: fx.GraphModule, gm_float: fx.GraphModule, stats: Stats,
                 moments: dict[str, Moments]) -> Transformed:
    """Return a copy of the weight-quantized `gm_q` with biases corrected for E[(Q(W)-W) x]."""
    gm_q = copy.deepcopy(gm_q)
    info: dict[str, dict] = {}
    for node in gm_q.graph.nodes:
        m = weighted_module(gm_q, node)
        if not isinstance(m, QuantizedLayer):
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or x.name not in moments:
            info[node.target] = {"bias_correction": "skipped: input mean unknown"}
            continue
        w_float = gm_float.get_submodule(node.target).weight.detach()
        shift = input_contribution(m, moments[x.name].mean, weight=m.weight.detach() - w_float)
        with torch.no_grad():
            ensure_bias(m).sub_(shift.to(m.weight.dtype))
        info[node.target] = {"bias_correction_max": float(shift.abs().max())}
    return Transformed(gm_q, stats, info)
