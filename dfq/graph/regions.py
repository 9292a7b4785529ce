"""Equalization regions: the layers around residual adds and channel concatenations that
share one scale vector.

A tensor that flows through a residual add (MobileNetV2's bottleneck stream, a ResNet stage) is
a sum of several producers' outputs; a concatenation (DeepLab's ASPP and decoder) stacks several
producers' outputs along the channels. Either way, scaling channel c of the combined tensor by
1/s_c is exact if every producer divides the output channels it contributes by their s, and every
consumer multiplies the input channels it reads by theirs (adds and concatenations are linear,
ReLU is positively homogeneous). A region is the closure of such tensors, each placed at a
channel offset in one region-wide channel space; anything else touching it (the network input
or output, a clip, a channel-changing op) leaves it unequalized, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from dfq.graph.ops import (
    activation_of,
    channel_padding,
    describe,
    is_add,
    is_cat,
    is_pass_through,
    is_shape_query,
    is_spatial_slice,
    layer_kind,
    weighted_module,
)


@dataclass(frozen=True)
class Region:
    producers: tuple[
        tuple[str, int], ...
    ]  # (weighted layer, offset of its output channels in the region)
    consumers: tuple[
        tuple[str, int, int], ...
    ]  # (weighted layer, first region channel it reads, how many)
    channels: int
    clips: tuple[
        tuple[str, int], ...
    ] = ()  # (upper clip node: ReLU6 & co. or ChannelMin, its offset)

    @property
    def kind(self) -> str:
        return (
            "concatenation"
            if any(off for _, off, *_ in self.producers + self.consumers)
            else "residual"
        )


def _inside(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops a region may contain: adds, channel concatenations, channel-keeping ops, and
    activations that a per-channel scale commutes with (ReLU) or that can carry per-channel
    bounds (ReLU6, hardtanh(0, b), ChannelMin: clip(x / s, 0, b) = min(relu(x), b * s) / s)."""
    act = activation_of(gm, node)
    return (
        is_add(node)
        or is_cat(node)
        or (act is not None and (act.scale_invariant or act.rescalable))
        or is_pass_through(gm, node)
        or is_spatial_slice(node)
        or channel_padding(node) is not None
    )


def _inputs(node: fx.Node) -> list:
    if is_cat(node):
        return list(node.args[0])
    return (
        node.args[:1]
        if channel_padding(node) is not None or is_spatial_slice(node)
        else list(node.args)
    )


def _shift(node: fx.Node) -> int:
    """Where a node's (first) input sits relative to its output: channel padding adds zero
    channels in front (ResNet "option A" shortcuts), like a concatenation with zeros."""
    pad = channel_padding(node)
    return pad[0] if pad else 0


def channels_of(gm: fx.GraphModule, node: fx.Node, memo: dict) -> int | None:
    """Channel count of a tensor built from weighted layers by region ops (None if unknown)."""
    if node in memo:
        return memo[node]
    m = weighted_module(gm, node)
    if m is not None:
        c = m.out_features if layer_kind(m) == "linear" else m.out_channels
    elif is_cat(node):
        parts = [channels_of(gm, a, memo) if isinstance(a, fx.Node) else None for a in node.args[0]]
        c = None if None in parts else sum(parts)
    elif channel_padding(node) is not None:
        c = channels_of(gm, node.args[0], memo)
        c = None if c is None else c + sum(channel_padding(node))
    elif _inside(gm, node):
        known = [channels_of(gm, a, memo) for a in _inputs(node) if isinstance(a, fx.Node)]
        c = next((k for k in known if k is not None), None)
    else:
        c = None
    memo[node] = c
    return c


def _region_from(gm: fx.GraphModule, start: fx.Node, memo: dict):
    """Walk the tensors connected to `start` through region ops, placing each at its channel
    offset. Returns (tensors, {producer: offset}, {consumer: (offset, width read)}, region
    width) or why it cannot be equalized."""
    offset = {start: 0}
    producers: dict[fx.Node, int] = {start: 0} if weighted_module(gm, start) is not None else {}
    consumers: dict[fx.Node, tuple[int, int]] = {}
    todo = [start]

    def place(n: fx.Node, off: int) -> str | None:
        if offset.setdefault(n, off) != off:
            return f"{n.name} would sit at two channel offsets"
        if n not in seen:
            seen.add(n)
            todo.append(n)
        return None

    def width(n) -> int | None:
        return channels_of(gm, n, memo) if isinstance(n, fx.Node) else None

    seen = {start}
    while todo:
        n = todo.pop()
        o = offset[n]
        if weighted_module(gm, n) is None:  # a producer's own inputs are outside the region
            ins, pos = _inputs(n), o + _shift(n)
            if is_add(n) and not all(isinstance(a, fx.Node) for a in ins):
                return "an add with a constant is not scale-invariant"
            for a in ins:
                if is_cat(n) and width(a) is None:
                    return (
                        "a concatenation joins tensors that are not layer outputs "
                        "(e.g. reshaped head outputs)"
                    )
                if isinstance(a, fx.Node):
                    if weighted_module(gm, a) is not None:
                        producers[a] = pos
                    elif a.op == "placeholder":
                        return "the region reads the network input"
                    elif not _inside(gm, a):
                        return f"the region reads {describe(gm, a)}, which is not scale-invariant"
                    if (why := place(a, pos)) is not None:
                        return why
                if is_cat(n):
                    pos += width(a)
        for u in n.users:
            if is_shape_query(u):
                continue
            if u.op == "output":
                return "the region's tensor is a network output"
            if weighted_module(gm, u) is not None:
                if u.args[0] is not n:
                    return f"{u.target} reads the region as a second argument"
                if consumers.setdefault(u, (o, width(n))) != (o, width(n)):
                    return f"{u.target} reads the region at two offsets"
            elif is_cat(u):
                before = 0
                for a in u.args[0]:
                    if a is n:
                        break
                    if width(a) is None:
                        return "a concatenation input has no known width"
                    before += width(a)
                if (why := place(u, o - before)) is not None:
                    return why
            elif _inside(gm, u):
                if (why := place(u, o - _shift(u))) is not None:
                    return why
            else:
                return (
                    f"the region's tensor goes through {describe(gm, u)}, "
                    "which is not scale-invariant"
                )
    if any(width(n) is None for n in offset):
        return "a tensor of the region has no known width"
    low = min(offset.values())
    total = max(off + width(n) for n, off in offset.items()) - low
    return (
        {n: off - low for n, off in offset.items()},
        {n: off - low for n, off in producers.items()},
        {n: (off - low, w) for n, (off, w) in consumers.items()},
        total,
    )


def _reads_per_channel(consumer, width: int) -> bool:
    """The consumer's inputs are the `width` channels it reads, each repeated k >= 1 times
    (flatten)."""
    n_in = consumer.in_features if layer_kind(consumer) == "linear" else consumer.in_channels
    return n_in % width == 0 and (n_in == width or layer_kind(consumer) == "linear")


def find_regions(gm: fx.GraphModule) -> tuple[list[Region], dict[str, str]]:
    """All regions (in graph order), and why the others are left alone (by add/cat node, or
    by the layer whose output several layers read)."""
    regions: list[Region] = []
    skipped: dict[str, str] = {}
    done: set[fx.Node] = set()
    memo: dict = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        layer = weighted_module(gm, node) is not None
        if not (is_add(node) or is_cat(node) or layer) or node in done:
            continue
        found = _region_from(gm, node, memo)
        if layer and (isinstance(found, str) or len(found[2]) < 2):
            continue  # one reader is a pair (dfq.graph.layers); the pair's note says why not
        if isinstance(found, str):
            skipped[node.name] = found
            done.add(node)
            continue
        tensors, producers, consumers, width = found
        done |= set(tensors)
        mods = {n: weighted_module(gm, n) for n in producers.keys() | consumers.keys()}
        covered = [False] * width
        for p, off in producers.items():
            covered[off : off + channels_of(gm, p, memo)] = [True] * channels_of(gm, p, memo)
        for pad_node, off in tensors.items():  # channel padding's zeros: any scale keeps them 0
            if (pad := channel_padding(pad_node)) is not None:
                inner = channels_of(gm, pad_node.args[0], memo)
                covered[off : off + pad[0]] = [True] * pad[0]
                covered[off + pad[0] + inner : off + pad[0] + inner + pad[1]] = [True] * pad[1]
        if not all(covered):
            skipped[node.name] = "some of the region's channels come from no layer"
        elif not all(_reads_per_channel(mods[c], w) for c, (_, w) in consumers.items()):
            skipped[node.name] = "a consumer does not read the region channel by channel"
        else:
            clips = [n for n in tensors if (a := activation_of(gm, n)) is not None and a.rescalable]
            regions.append(
                Region(
                    tuple((n.target, producers[n]) for n in sorted(producers, key=order.get)),
                    tuple((n.target, *consumers[n]) for n in sorted(consumers, key=order.get)),
                    width,
                    tuple((n.name, tensors[n]) for n in sorted(clips, key=order.get)),
                )
            )
    return regions, skipped
