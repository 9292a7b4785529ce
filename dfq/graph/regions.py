"""Residual regions: the layers around adds that share one equalization scale vector.

Every tensor that flows through a residual add (MobileNetV2's bottleneck stream, a ResNet
stage) is a sum of several producers' outputs and is read by several consumers. Scaling its
channel c by 1/s_c is exact if every producer divides its output channel c by s_c and every
consumer multiplies its input channel c by s_c (adds are linear, ReLU is positively
homogeneous). A region is the closure of such tensors; anything else touching it (the network
input or output, a channel-changing op, a clip) leaves it unequalized, with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from dfq.graph.ops import activation_of, describe, features_per_channel_ok, is_add, is_pass_through, layer_kind, weighted_module


@dataclass(frozen=True)
class Region:
    producers: tuple[str, ...]  # weighted layers whose outputs are summed into the region
    consumers: tuple[str, ...]  # weighted layers that read it


def _inside(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops a region may contain: adds, scale-invariant activations and channel-keeping ops."""
    act = activation_of(gm, node)
    return is_add(node) or (act is not None and act.scale_invariant) or is_pass_through(gm, node)


def _region_from(gm: fx.GraphModule, start: fx.Node) -> tuple[set[fx.Node], set[fx.Node], set[fx.Node]] | str:
    tensors, producers, consumers = {start}, set(), set()
    todo = [start]
    while todo:
        n = todo.pop()
        if n not in producers:
            for a in n.args:
                if not isinstance(a, fx.Node):
                    continue
                if weighted_module(gm, a) is not None:
                    producers.add(a)
                elif a.op == "placeholder":
                    return "a residual add reads the network input"
                elif not _inside(gm, a):
                    return f"a residual add reads {describe(gm, a)}, which is not scale-invariant"
                if a not in tensors:
                    tensors.add(a)
                    todo.append(a)
        for u in n.users:
            if u.op == "output":
                return "the residual stream is a network output"
            if weighted_module(gm, u) is not None:
                if u.args[0] is not n:
                    return f"{u.target} reads the stream as a second argument"
                consumers.add(u)
            elif _inside(gm, u):
                if u not in tensors:
                    tensors.add(u)
                    todo.append(u)
            else:
                return f"the residual stream goes through {describe(gm, u)}, which is not scale-invariant"
    return tensors, producers, consumers


def find_regions(gm: fx.GraphModule) -> tuple[list[Region], dict[str, str]]:
    """All residual regions (in graph order), and why the others are left alone (by add node)."""
    regions: list[Region] = []
    skipped: dict[str, str] = {}
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if not is_add(node) or node in seen:
            continue
        found = _region_from(gm, node)
        if isinstance(found, str):
            skipped[node.name] = found
            seen.add(node)
            continue
        tensors, producers, consumers = found
        seen |= tensors
        mods = {n: weighted_module(gm, n) for n in producers | consumers}
        out_channels = {m.out_features if layer_kind(m) == "linear" else m.out_channels
                        for n, m in mods.items() if n in producers}
        if len(out_channels) != 1 or any(layer_kind(mods[n]) == "grouped" for n in mods):
            skipped[node.name] = "producers disagree on channels, or a grouped conv touches the stream"
            continue
        first = mods[next(iter(producers))]
        if not all(features_per_channel_ok(first, mods[c]) for c in consumers):
            skipped[node.name] = "a consumer does not read the stream channel by channel"
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        regions.append(Region(tuple(n.target for n in sorted(producers, key=order.get)),
                              tuple(n.target for n in sorted(consumers, key=order.get))))
    return regions, skipped
