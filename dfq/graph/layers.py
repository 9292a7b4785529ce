"""Which layers can be equalized with which: walking the graph through scale-invariant ops.

A pair (first, second) is two weighted layers such that first's output reaches second's
input only through ops that commute with a positive per-channel scale (ReLU, pooling,
padding, identity, flatten), or through upper clips (ReLU6) that equalization can carry as
per-channel bounds. Depthwise and grouped convs are both a second and a first, which gives the
conv -> depthwise -> conv triples of MobileNets and the conv -> grouped -> conv ones of ResNeXt
and RegNet. Everything else is reported with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from dfq.graph.ops import (
    Activation,
    activation_of,
    describe,
    features_per_channel_ok,
    is_add,
    is_cat,
    is_pass_through,
    is_shape_query,
    weighted_module,
)


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    activations: tuple[Activation, ...]  # clipping activations between the two layers
    clips: tuple[str, ...] = ()  # names of the nodes among them with an upper clip


def weighted_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if weighted_module(gm, n) is not None]


def _follow(
    gm: fx.GraphModule, node: fx.Node
) -> tuple[fx.Node, tuple[Activation, ...], tuple[str, ...]] | str:
    """From a layer's output, the next weighted layer along a single-user scale-invariant path."""
    acts: list[Activation] = []
    clips: list[str] = []
    cur = node
    while True:
        users = [u for u in cur.users if not is_shape_query(u)]
        if not users or any(u.op == "output" for u in users):
            return "its output is a network output"
        if any(is_add(u) for u in users):
            return "its output feeds a residual add"
        if any(is_cat(u) for u in users):
            return "its output feeds a concatenation"
        if len(users) > 1:
            return f"its output feeds {len(users)} consumers"
        nxt = users[0]
        if weighted_module(gm, nxt) is not None:
            return nxt, tuple(acts), tuple(clips)
        act = activation_of(gm, nxt)
        if act is not None:
            acts.append(act)
            if not act.scale_invariant:
                clips.append(nxt.name)
        elif not is_pass_through(gm, nxt):
            return f"its output goes through {describe(gm, nxt)}, which is not scale-invariant"
        cur = nxt


def find_pairs(gm: fx.GraphModule) -> tuple[list[Pair], dict[str, str]]:
    """All equalization pairs in topological order, and why each other layer starts none."""
    pairs: list[Pair] = []
    skipped: dict[str, str] = {}
    for node in weighted_nodes(gm):
        found = _follow(gm, node)
        if isinstance(found, str):
            skipped[node.target] = found
            continue
        nxt, acts, clips = found
        first, second = weighted_module(gm, node), weighted_module(gm, nxt)
        if not features_per_channel_ok(first, second):
            skipped[node.target] = (
                f"channel layout into {nxt.target} is not a flatten of its output"
            )
        elif any(not (a.scale_invariant or a.rescalable) for a in acts):
            bad = next(a.kind for a in acts if not (a.scale_invariant or a.rescalable))
            skipped[node.target] = f"{bad} between it and {nxt.target} is not scale-invariant"
        else:
            pairs.append(Pair(node.target, nxt.target, acts, clips))
    return pairs, skipped
