"""Fold BatchNorm into the conv/linear before it, remembering its output distribution.

A fx pattern pass in the spirit of torch.fx.experimental.optimization.fuse: only a BN whose
input is a conv/linear with no other user is folded; a BN module, or a functional batch_norm
on constant running statistics (parameters and buffers), alike. The BN's output distribution becomes
that layer's pre-activation statistics, which later passes read instead of data: mean beta and std
|gamma| sqrt(v / (v + eps)), the std of (x - m) / sqrt(v + eps) * gamma + beta when x has the
running mean m and variance v. The factor is ~1 for live channels; for a dead one (v << eps, e.g.
TF's eps 1e-3 against v ~ 1e-15) it is ~0, where |gamma| alone claims a spread that never occurs.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import fx, nn

from dfq.graph.channels import ensure_bias
from dfq.graph.ops import BatchNormSpec, batchnorm_of, is_cat, is_shape_query, weighted_module
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import BNStats, Stats, freeze


def _fold_into(layer: nn.Module, bn: BatchNormSpec) -> BNStats:
    """w' = w * g/sqrt(v+eps), b' = (b - m) * g/sqrt(v+eps) + beta; returns
    N(beta, g² v/(v+eps))."""
    w = layer.weight
    gamma = bn.gamma.detach() if bn.gamma is not None else torch.ones_like(bn.mean)
    beta = bn.beta.detach() if bn.beta is not None else torch.zeros_like(bn.mean)
    scale = gamma / torch.sqrt(bn.var + bn.eps)
    bias = ensure_bias(layer)
    with torch.no_grad():
        w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
        bias.copy_((bias - bn.mean) * scale + beta)
    mean, std = bn.output_moments()
    return BNStats(mean=mean.clone().to(w.dtype), std=std.to(w.dtype))


def _users(node: fx.Node) -> int:
    return sum(not is_shape_query(u) for u in node.users)


def _concatenated_layers(gm: fx.GraphModule, cat: fx.Node, bn: BatchNormSpec):
    """A BN after a channel concatenation of convs (MixNet's split -> convs -> cat -> BN) folds
    into each conv its slice of channels: [(layer node, layer, its BN channels)], or None."""
    if not is_cat(cat) or _users(cat) != 1:
        return None
    parts, start = [], 0
    for p in cat.args[0]:
        layer = weighted_module(gm, p) if isinstance(p, fx.Node) else None
        if not isinstance(layer, nn.Conv2d) or _users(p) != 1 or list(cat.args[0]).count(p) != 1:
            return None
        parts.append((p, layer, slice(start, start + layer.out_channels)))
        start += layer.out_channels
    return parts if start == bn.mean.numel() else None


def _sliced(bn: BatchNormSpec, part: slice) -> BatchNormSpec:
    def cut(t):
        return None if t is None else t[part]

    return dataclasses.replace(
        bn, mean=bn.mean[part], var=bn.var[part], gamma=cut(bn.gamma), beta=cut(bn.beta)
    )


def _foldable(
    gm: fx.GraphModule, bn_node: fx.Node, bn: BatchNormSpec
) -> list[tuple[fx.Node, nn.Module, slice | None]] | str:
    """The layer nodes this BN folds into (with their slice of its channels), or why it
    cannot."""
    src = bn_node.args[0]
    layer = weighted_module(gm, src) if isinstance(src, fx.Node) else None
    if layer is None and isinstance(src, fx.Node) and nn.Conv2d in bn.layers:
        if (parts := _concatenated_layers(gm, src, bn)) is not None:
            return parts
    if layer is None:
        return "input is not a conv/linear"
    if sum(not is_shape_query(u) for u in src.users) != 1:
        return f"input layer {src.target} has other users"
    if not isinstance(layer, bn.layers):
        return "BN type does not match the layer"
    return [(src, layer, None)]


def fold_batchnorm(gm: fx.GraphModule, stats: Stats | None = None) -> Transformed:
    """Return a copy of `gm` with every foldable BN folded, and the statistics it leaves."""
    gm = copy.deepcopy(gm)
    new_stats = dict(stats or {})
    info: Records = {}
    for node in list(gm.graph.nodes):
        if (named := batchnorm_of(gm, node)) is None:
            continue
        name, bn = named
        found = bn if isinstance(bn, str) else _foldable(gm, node, bn)
        if isinstance(found, str):
            info[name] = LayerRecord(bn_folded=False, note=f"BatchNorm left in float: {found}")
            continue
        for layer_node, layer, part in found:
            new_stats[layer_node.target] = _fold_into(
                layer, bn if part is None else _sliced(bn, part)
            )
            info[layer_node.target] = LayerRecord(bn_folded=name)
        node.replace_all_uses_with(node.args[0])
        constants = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for (
            a
        ) in constants:  # the functional call's statistics (their module may hold its activation)
            if not a.users:
                gm.graph.erase_node(a)
        if node.op == "call_module":
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return Transformed(gm, freeze(new_stats), info)
