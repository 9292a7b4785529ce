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
import inspect
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.graph.channels import ensure_bias
from dfq.graph.ops import BATCHNORMS, is_shape_query, weighted_module
from dfq.stats import BNStats, Stats, freeze
from dfq.transforms import Transformed


@dataclass(frozen=True)
class _BatchNorm:
    """What folding needs of a BatchNorm: a module, or a functional batch_norm on constant
    running statistics (timm's BatchNormAct2d subclasses BatchNorm2d and calls F.batch_norm in
    its forward, so fx traces through it: get_attr nodes feeding a call_function)."""

    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None  # None: not affine
    beta: torch.Tensor | None
    eps: float
    layers: tuple[type, ...] = (nn.Linear, nn.Conv2d)  # what it may follow (a functional call: any)


_BN_SIGNATURE = inspect.signature(F.batch_norm)
_BN_TENSORS = ("running_mean", "running_var", "weight", "bias")


def _batchnorm_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, _BatchNorm | str] | None:
    """(name, the BatchNorm a node computes in eval mode or why it cannot be folded), None if
    the node is no BN. A functional call is named after the module owning its statistics."""
    if node.op == "call_module" and isinstance(bn := gm.get_submodule(node.target), BATCHNORMS):
        if bn.running_mean is None:
            return node.target, "tracks no running statistics"
        return node.target, _BatchNorm(bn.running_mean, bn.running_var, bn.weight if bn.affine else None,
                                       bn.bias if bn.affine else None, bn.eps,
                                       (nn.Linear,) if isinstance(bn, nn.BatchNorm1d) else (nn.Conv2d,))
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
    args.apply_defaults()
    tensors = [args.arguments[k] for k in _BN_TENSORS]
    if not all(t is None or (isinstance(t, fx.Node) and t.op == "get_attr") for t in tensors) or None in tensors[:2]:
        return node.name, "functional batch_norm without constant running statistics"
    name = tensors[0].target.rpartition(".")[0] or node.name
    if args.arguments["training"] is not False:
        return name, "functional batch_norm in training mode (batch statistics)"
    mean, var, gamma, beta = (None if t is None else attrgetter(t.target)(gm) for t in tensors)
    return name, _BatchNorm(mean, var, gamma, beta, args.arguments["eps"])


def _fold_into(layer: nn.Module, bn: _BatchNorm) -> BNStats:
    """w' = w * g/sqrt(v+eps), b' = (b - m) * g/sqrt(v+eps) + beta; returns N(beta, g² v/(v+eps))."""
    w = layer.weight
    gamma = bn.gamma.detach() if bn.gamma is not None else torch.ones_like(bn.mean)
    beta = bn.beta.detach() if bn.beta is not None else torch.zeros_like(bn.mean)
    scale = gamma / torch.sqrt(bn.var + bn.eps)
    bias = ensure_bias(layer)
    with torch.no_grad():
        w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))).to(w.dtype))
        bias.copy_((bias - bn.mean) * scale + beta)
    std = gamma.abs() * torch.sqrt(bn.var / (bn.var + bn.eps))
    return BNStats(mean=beta.clone().to(w.dtype), std=std.to(w.dtype))


def _foldable(gm: fx.GraphModule, bn_node: fx.Node, bn: _BatchNorm) -> tuple[fx.Node, nn.Module] | str:
    """The layer node this BN folds into, or why it cannot."""
    src = bn_node.args[0]
    layer = weighted_module(gm, src) if isinstance(src, fx.Node) else None
    if layer is None:
        return "input is not a conv/linear"
    if sum(not is_shape_query(u) for u in src.users) != 1:
        return f"input layer {src.target} has other users"
    if not isinstance(layer, bn.layers):
        return "BN type does not match the layer"
    return src, layer


def fold_batchnorm(gm: fx.GraphModule, stats: Stats | None = None) -> Transformed:
    """Return a copy of `gm` with every foldable BN folded, and the statistics it leaves."""
    gm = copy.deepcopy(gm)
    new_stats = dict(stats or {})
    info: dict[str, dict] = {}
    for node in list(gm.graph.nodes):
        if (named := _batchnorm_of(gm, node)) is None:
            continue
        name, bn = named
        found = bn if isinstance(bn, str) else _foldable(gm, node, bn)
        if isinstance(found, str):
            info[name] = {"bn_folded": False, "note": f"BatchNorm left in float: {found}"}
            continue
        src, layer = found
        new_stats[src.target] = _fold_into(layer, bn)
        info[src.target] = {"bn_folded": name}
        node.replace_all_uses_with(src)
        constants = [a for a in node.all_input_nodes if a.op == "get_attr"]
        gm.graph.erase_node(node)
        for a in constants:  # the functional call's statistics (their module may hold its activation)
            if not a.users:
                gm.graph.erase_node(a)
        if node.op == "call_module":
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return Transformed(gm, freeze(new_stats), info)
