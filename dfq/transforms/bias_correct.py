"""Data-free bias correction (DFQ paper, section 4.2).

Quantizing W to Q(W) shifts each output's mean by (Q(W) - W) E[x]. E[x] of every layer input
comes from the BN statistics of the producing layers (clipped-normal means through ReLU and
ReLU6, sums across residual adds: see dfq.statistics.moments), so the shift can be subtracted from
the bias without data. Works for any weight bit width.

With data (distilled or real), `correct_bias_empirical_` measures the shift instead: the
mean output difference between the float and the fully quantized layer, layer by layer in
topological order, each correction applied before the next layer is measured.

Activation quantizers shift means too: a range that clips the tail lowers E[x], and a mass
held at a clip bound (ReLU6's 6) rounds to the nearest grid value. `correct_activation_bias_`
subtracts Q(W) (E[Q(x)] - E[x]) from each layer's bias, the shift taken in closed form from
the same clipped-normal moments (dfq.quant.expected_error).
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from dfq.graph.channels import ensure_bias, input_contribution
from dfq.graph.ops import weighted_module
from dfq.quant.activations import input_quantizer_node, quantized_moments
from dfq.quant.expected_error import ClippedChannels
from dfq.quant.modules import ActQuant, QuantizedLayer
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats
from dfq.statistics.moments import Moments


def correct_bias(
    gm_q: fx.GraphModule, gm_float: fx.GraphModule, stats: Stats, moments: dict[str, Moments]
) -> Transformed:
    """Return a copy of the weight-quantized `gm_q` with biases corrected for E[(Q(W)-W) x]."""
    gm_q = copy.deepcopy(gm_q)
    info: Records = {}
    for node in gm_q.graph.nodes:
        m = weighted_module(gm_q, node)
        if not isinstance(m, QuantizedLayer):
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or x.name not in moments:
            info[node.target] = LayerRecord(bias_correction="skipped: input mean unknown")
            continue
        w_float = gm_float.get_submodule(node.target).weight.detach()
        shift = input_contribution(m, moments[x.name].mean, weight=m.weight.detach() - w_float)
        with torch.no_grad():
            ensure_bias(m).sub_(shift.to(m.weight.dtype))
        info[node.target] = LayerRecord(bias_correction_max=float(shift.abs().max()))
    return Transformed(gm_q, stats, info)


def _max_pool_between(gm: fx.GraphModule, quantizer: fx.Node, node: fx.Node) -> bool:
    """Whether a max pool sits between a layer and its input quantizer (a mean shift does not
    pass through a max linearly)."""
    cur = node.args[0]
    while cur is not quantizer:
        target = type(gm.get_submodule(cur.target)) if cur.op == "call_module" else cur.target
        if target in (torch.nn.MaxPool2d, torch.nn.functional.max_pool2d):
            return True
        cur = cur.args[0]
    return False


def correct_activation_bias_(gm: fx.GraphModule, moments: dict[str, Moments]) -> Records:
    """In place: bias -= Q(W) (E[Q(x)] - E[x]) for every layer that reads a quantized input
    whose moments are known (ranges must be set)."""
    known = quantized_moments(gm, moments)
    info: Records = {}
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        q = input_quantizer_node(gm, node) if isinstance(m, QuantizedLayer) else None
        aq = gm.get_submodule(q.target) if q is not None else None
        if not isinstance(aq, ActQuant) or not aq.quantizing:
            continue
        if q.args[0].name not in known or _max_pool_between(gm, q, node):
            why = "input moments unknown" if q.args[0].name not in known else "max pool"
            info[node.target] = LayerRecord(activation_bias_correction=f"skipped: {why}")
            continue
        dist = ClippedChannels.of(known[q.args[0].name])
        shift = dist.shift(float(aq.scale), int(aq.zero_point), aq.grid)
        delta = input_contribution(m, shift.to(m.weight.dtype))
        with torch.no_grad():
            ensure_bias(m).sub_(delta.to(m.weight.dtype))
        info[node.target] = LayerRecord(activation_bias_correction_max=float(delta.abs().max()))
    return info


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.detach().transpose(0, 1).flatten(1).mean(1)


def correct_bias_empirical_(gm_q: fx.GraphModule, gm_float: fx.GraphModule, batches) -> Records:
    """In place on `gm_q`: bias += E[y_float] - E[y_quant] per layer, measured on `batches`."""
    x = torch.cat([b for b in batches])
    names = [
        n.target for n in gm_q.graph.nodes if isinstance(weighted_module(gm_q, n), QuantizedLayer)
    ]
    ref: dict[str, torch.Tensor] = {}
    hooks = [
        gm_float.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: ref.__setitem__(n, _channel_mean(out))
        )
        for n in names
    ]
    info: Records = {}

    def fix(mod, inp, out, name):
        shift = ref[name] - _channel_mean(out)
        with torch.no_grad():
            ensure_bias(mod).add_(shift.to(mod.bias.dtype))
        info[name] = LayerRecord(
            bias_correction_max=float(shift.abs().max()), bias_correction="empirical"
        )
        return out + shift.reshape(1, -1, *([1] * (out.dim() - 2))).to(out.dtype)

    try:
        with torch.no_grad():
            gm_float(x)
            for h in hooks:
                h.remove()
            hooks = [
                gm_q.get_submodule(n).register_forward_hook(
                    lambda mod, inp, out, n=n: fix(mod, inp, out, n)
                )
                for n in names
            ]
            gm_q(x)
    finally:
        for h in hooks:
            h.remove()
    return info
