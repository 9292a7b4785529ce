"""Where activations are quantized, and with which ranges.

Quantization points follow what an int8 runtime keeps in int8 memory: the network input and
the output of every conv/linear, add, concatenation and product, taken after the clipping
activation that follows it (fused, as runtimes fuse Conv+ReLU); non-clipping activations
(SiLU, GELU, Hardswish, sigmoid gates) requantize, as average pools do; and every tensor a
conv/linear reads is quantized. Network outputs stay float (runtimes dequantize the last
layer's int32 accumulator). A point whose range cannot be derived without data stays float
and is reported.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import fx

from dfq.config import RANGE_RULE, QuantConfig
from dfq.graph.modules import ChannelMin
from dfq.graph.ops import (
    activation_of,
    is_add,
    is_cat,
    is_mul,
    is_pass_through,
    keeps_grid,
    pointwise_of,
    weighted_module,
)
from dfq.quant.expected_error import ClippedChannels, Samples, best_range
from dfq.quant.modules import FLOAT, OBSERVE, QUANTIZE, ActQuant, QuantizedLayer
from dfq.quant.primitives import qparams
from dfq.records import LayerRecord, Records
from dfq.statistics.moments import Moments


def _fused_output(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The node whose output holds `node`'s value after a fused clipping activation."""
    users = list(node.users)
    if len(users) == 1 and activation_of(gm, users[0]) is not None:
        return users[0]
    return node


def grid_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The node that sets `node`'s grid: back through ops that keep their input's grid."""
    cur = node
    while (
        (is_pass_through(gm, cur) or _is_channel_min(gm, cur))
        and keeps_grid(gm, cur)
        and cur.args
        and isinstance(cur.args[0], fx.Node)
    ):
        cur = cur.args[0]
    return cur


def default_quantization_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes (in graph order) whose outputs get an activation quantizer (a runtime profile,
    dfq/runtimes, may choose others): the network input; conv/linear, add, concatenation and
    product outputs (after a fused clipping activation); non-clipping activations (SiLU, GELU,
    Hardswish, sigmoid gates: an int8 runtime computes them on int8 and requantizes); average
    pools; and whatever else feeds a conv/linear, so that every layer reads an int8 input."""
    points: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or pointwise_of(gm, node) is not None:
            points.add(node)
        elif weighted_module(gm, node) is not None or is_add(node) or is_cat(node) or is_mul(node):
            points.add(_fused_output(node, gm))
        elif is_pass_through(gm, node) and not keeps_grid(gm, node):
            points.add(node)
    for node in gm.graph.nodes:
        if weighted_module(gm, node) is not None and isinstance(node.args[0], fx.Node):
            points.add(grid_source(gm, node.args[0]))
    return [n for n in gm.graph.nodes if n in points and not any(u.op == "output" for u in n.users)]


def insert_quantizers(
    gm: fx.GraphModule,
    points: list[fx.Node],
    config: QuantConfig,
    reciprocal: bool = False,
    reads_quantized: Callable[[fx.GraphModule, fx.Node], bool] | None = None,
) -> fx.GraphModule:
    """Return a copy of `gm` with an ActQuant (unset range) after each point, by node name, on
    the activation grid (the network inputs: on `config.input_grid`).

    `reciprocal`: the quantizers multiply by float32 1/scale (ncnn); `reads_quantized(gm, user)`:
    which users of a point read the quantized value (default: all; ncnn: its int8 layers only).
    """
    gm = copy.deepcopy(gm)
    names = {p.name for p in points}
    for node in list(gm.graph.nodes):
        if node.name not in names:
            continue
        target = f"act_quant_{node.name}"
        grid = config.input_grid if node.op == "placeholder" else config.activation_grid
        gm.add_submodule(target, ActQuant(grid, config.rounding, reciprocal=reciprocal))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(
            q,
            delete_user_cb=lambda u: (
                u is not q and (reads_quantized is None or reads_quantized(gm, u))
            ),
        )
    gm.graph.lint()
    gm.recompile()
    return gm


def quantizer_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """ActQuant call nodes keyed by the name of the node they quantize."""
    return {
        n.args[0].name: n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), ActQuant)
    }


def quantized_moments(gm: fx.GraphModule, moments: dict[str, Moments]) -> dict[str, Moments]:
    """The moments each quantizer's input follows, by quantized node name: those of the
    per-channel clip right after the quantizer where there is one (values above its bounds are
    clipped anyway)."""
    out = {}
    for src, qnode in quantizer_nodes(gm).items():
        clip = _channel_min_after(gm, qnode)
        m = moments[clip.name] if clip is not None and clip.name in moments else moments.get(src)
        if m is not None:
            out[src] = m
    return out


def set_ranges_from_moments_(
    gm: fx.GraphModule,
    moments: dict[str, Moments],
    only: set[str] | None = None,
    rule: str = RANGE_RULE,
) -> Records:
    """In place: per-tensor ranges from data-free moments; unknown ones are reported and their
    quantizers stay float.

    `rule`: "mse", the range of least expected error for the quantizer's grid
    (dfq.quant.expected_error); "std", [min lo, max hi] of the moments' mean +- n std ranges.
    The network inputs always get their exact range (the normalisation of [0, 1] pixels).
    `only` restricts this to some quantized nodes (by name), e.g. the network input, whose
    range the normalisation constants give exactly even when the other ranges come from data.
    """
    inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    known = quantized_moments(gm, moments)
    info: Records = {}
    for src, qnode in quantizer_nodes(gm).items():
        if only is not None and src not in only:
            continue
        aq = gm.get_submodule(qnode.target)
        m = known.get(src)
        if m is None:
            info[src] = LayerRecord(
                activation_range=None,
                note="no data-free range (moments unknown through this op): kept in float; "
                "--distill_range (or --calib) ranges it on data",
            )
            aq.mode = FLOAT  # never invent a range
            continue
        if rule == "mse" and src not in inputs:
            lo, hi = best_range(ClippedChannels.of(m), aq.grid)
        else:
            lo, hi = float(m.lo.min()), float(m.hi.max())
        aq.set_range(*qparams(torch.tensor(lo), torch.tensor(hi), aq.grid))
        info[src] = LayerRecord(activation_range=[round(lo, 4), round(hi, 4)])
    return info


def _subsample(x: torch.Tensor, max_elements: int = 1 << 22) -> torch.Tensor:
    """x flattened, on an evenly strided subsample for big tensors."""
    flat = x.detach().flatten().float()
    return flat[:: flat.numel() // max_elements + 1] if flat.numel() > max_elements else flat


def _percentiles(x: torch.Tensor, pct: float) -> tuple[float, float]:
    """(100 - pct, pct) percentiles of x (on a subsample of big tensors)."""
    q = torch.quantile(_subsample(x), torch.tensor([1 - pct / 100, pct / 100]))
    return float(q[0]), float(q[1])


def calibrate_(
    gm: fx.GraphModule, batches, percentile: float | None = None, rule: str = RANGE_RULE
) -> Records:
    """In place: ranges of every quantizer's input on data: min/max, the mean per-batch
    percentile, or (rule "mse", when no percentile is given) the range of least quantization
    error on the observed values (dfq.quant.expected_error, on up to 2^18 values per batch)."""
    quantizers = {src: gm.get_submodule(q.target) for src, q in quantizer_nodes(gm).items()}
    seen: dict[str, list] = {src: [] for src in quantizers}
    by_error = rule == "mse" and percentile is None

    def observe(src: str, x: torch.Tensor) -> None:
        seen[src].append(_subsample(x, 1 << 18) if by_error else _percentiles(x, percentile))

    hooks = []
    for src, aq in quantizers.items():
        aq.mode = OBSERVE
        aq.observed_min.fill_(float("inf"))
        aq.observed_max.fill_(float("-inf"))
        if percentile is not None or by_error:
            hooks.append(
                aq.register_forward_pre_hook(lambda mod, inp, src=src: observe(src, inp[0]))
            )
    try:
        with torch.no_grad():
            for x in batches:
                gm(x)
    finally:
        for h in hooks:
            h.remove()
    info: Records = {}
    for src, aq in quantizers.items():
        aq.mode = QUANTIZE
        if by_error:
            lo, hi = (torch.tensor(v) for v in best_range(Samples(torch.cat(seen[src])), aq.grid))
        elif percentile is not None:
            lo = torch.tensor(sum(a for a, _ in seen[src]) / len(seen[src]))
            hi = torch.tensor(sum(b for _, b in seen[src]) / len(seen[src]))
        else:
            lo, hi = aq.observed_min.clone(), aq.observed_max.clone()
        aq.set_range(*qparams(lo, hi, aq.grid))
        info[src] = LayerRecord(activation_range=[round(float(lo), 4), round(float(hi), 4)])
    return info


def _is_channel_min(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ChannelMin)


def _channel_min_after(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and _is_channel_min(gm, users[0]) else None


def snap_clips_to_grid_(gm: fx.GraphModule) -> int:
    """In place: put each ChannelMin that follows a quantizer onto that quantizer's grid, so that
    min(q, hi) stays on the grid: runtimes then apply it to int8 values exactly."""
    n = 0
    for qnode in quantizer_nodes(gm).values():
        clip = _channel_min_after(gm, qnode)
        aq = gm.get_submodule(qnode.target)
        if clip is None or not aq.quantizing:
            continue
        m = gm.get_submodule(clip.target)
        q = torch.clamp(torch.round(m.hi / aq.scale) + aq.zero_point, aq.grid.qmin, aq.grid.qmax)
        m.hi.copy_((q - aq.zero_point) * aq.scale)
        n += 1
    return n


def input_quantizer_node(gm: fx.GraphModule, node: fx.Node, arg: int = 0) -> fx.Node | None:
    """The ActQuant node (in any mode) that sets the grid of `node`'s input `arg` (the first by
    default), through grid-keeping ops; None if that input is not quantized at all."""
    cur = node.args[arg] if len(node.args) > arg else None
    while isinstance(cur, fx.Node):
        if cur.op == "call_module" and isinstance(gm.get_submodule(cur.target), ActQuant):
            return cur
        if not ((is_pass_through(gm, cur) or _is_channel_min(gm, cur)) and keeps_grid(gm, cur)):
            return None
        cur = cur.args[0]
    return None


def input_quantizer(gm: fx.GraphModule, node: fx.Node, arg: int = 0) -> ActQuant | None:
    """The quantizer that sets the grid of `node`'s input `arg` (through grid-keeping ops), if
    it quantizes."""
    q = input_quantizer_node(gm, node, arg)
    aq = gm.get_submodule(q.target) if q is not None else None
    return aq if aq is not None and aq.quantizing else None


def quantize_biases_(gm: fx.GraphModule, config: QuantConfig) -> Records:
    """In place: biases on their grid, int32 at s_weight * s_input or 8/16 bits on their own
    range."""
    info: Records = {}
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if not isinstance(m, QuantizedLayer) or m.bias is None:
            continue
        aq = input_quantizer(gm, node)
        scale = m.weight_scale.double() * aq.scale.double() if aq is not None else None
        # at s_w * s_in an int32 overflows once bits_w + bits_a approach 31 (W16A16): the bias
        # would be clamped, so it goes onto its own range instead (and says so)
        fits = scale is not None and bool(
            (m.bias.detach().double().abs() / scale <= config.bias_grid.qmax).all()
        )
        if config.bits_bias == 32 and fits:
            note = "int32 at s_w * s_in"
        elif config.bits_bias == 32 and aq is not None:
            scale = m.bias.detach().abs().max().double() / config.bias_grid.qmax
            note = "int32 on its own range (it overflows int32 at s_w * s_in)"
        else:
            scale = m.bias.detach().abs().max().double().clamp_min(1e-30) / config.bias_grid.qmax
            note = f"int{config.bits_bias} on its own range" + (
                "" if aq else " (input not quantized)"
            )
        m.set_bias_quant(scale, config.bias_grid)
        info[node.target] = LayerRecord(bias=note)
    return info
