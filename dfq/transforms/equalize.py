"""Cross-layer equalization (DFQ paper, section 4.1).

For a pair (W1, W2) with a positively homogeneous op between them, dividing output channel i
of W1 by s_i and multiplying input channel i of W2 by s_i leaves the function unchanged.
With r1, r2 the per-channel ranges (max |w|), s_i = sqrt(r1_i / r2_i) makes both ranges
sqrt(r1_i * r2_i): the best joint per-tensor precision. Pairs are swept until no scale moves.

A ReLU6 (or hardtanh(0, b)) between the layers is split into ReLU + ChannelMin(6) first, and
the ChannelMin bounds are divided by s with the weights: ReLU6(x / s) * s = min(ReLU(x), 6 / s)
... * s, so the float function stays exactly the same with ReLU6 kept.

With `residual_regions`, the tensors that pairs cannot reach are equalized too: those around
residual adds, channel concatenations (channel-sliced), channel padding and outputs read by
several layers. All producers of such a region share one scale vector (each takes its slice),
chosen from the largest producer and consumer range of each channel, and every consumer takes
the inverse (see dfq.graph.regions).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.config import EqualizeConfig
from dfq.graph.channels import features_per_channel
from dfq.graph.layers import Pair, find_pairs
from dfq.graph.modules import ChannelMin
from dfq.graph.ops import activation_of
from dfq.graph.regions import Region, channels_of, find_regions
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats, freeze


def output_ranges(m: nn.Module) -> torch.Tensor:
    """max |w| per output channel."""
    return m.weight.detach().abs().flatten(1).amax(1)


def _by_input(m: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """w as (groups, out/groups, in/groups, rest): input channel g * in/groups + c is w[g, :, c].
    A grouped conv's input channel feeds only its group's outputs (a depthwise filter: its own
    single output), so a scale on that channel is a column scale within its group."""
    g = getattr(m, "groups", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def input_ranges(m: nn.Module, channels: int) -> torch.Tensor:
    """max |w| per producer channel feeding `m` (over the outputs of its group and the kernel)."""
    r = _by_input(m, m.weight.detach().abs()).amax((1, 3)).flatten()
    k = features_per_channel(m, channels)
    return r.reshape(channels, k).amax(1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """s = sqrt(r1 / r2), and 1 where either range is zero (dead channels stay as they are)."""
    ok = (r1 > 0) & (r2 > 0)
    s = torch.sqrt(torch.where(ok, r1, 1) / torch.where(ok, r2, 1))
    return torch.nan_to_num(s, nan=1.0, posinf=1.0, neginf=1.0)


def scale_outputs_(m: nn.Module, s: torch.Tensor) -> None:
    """In place: W[i] /= s_i, b[i] /= s_i."""
    with torch.no_grad():
        m.weight.div_(s.reshape(-1, *([1] * (m.weight.dim() - 1))))
        if m.bias is not None:
            m.bias.div_(s)


def scale_inputs_(m: nn.Module, s: torch.Tensor) -> None:
    """In place: W[:, i] *= s_i, for the outputs of input channel i's group (flatten repeats)."""
    w = m.weight
    k = features_per_channel(m, s.numel())
    with torch.no_grad():
        v = _by_input(m, w)
        w.copy_((v * s.repeat_interleave(k).reshape(v.shape[0], 1, v.shape[2], 1)).reshape(w.shape))


def scale_pair_(first: nn.Module, second: nn.Module, s: torch.Tensor) -> None:
    """W1[i] /= s_i, b1[i] /= s_i, W2[:, i] *= s_i (in place on the modules given)."""
    scale_outputs_(first, s)
    scale_inputs_(second, s)


def _region_ranges(gm: fx.GraphModule, region: Region) -> tuple[torch.Tensor, torch.Tensor]:
    """Per region channel: the largest output range of the producers that write it and the
    largest input range of the consumers that read it (0 where none does)."""
    r1 = torch.zeros(region.channels, dtype=gm.get_submodule(region.producers[0][0]).weight.dtype)
    r2 = torch.zeros_like(r1)
    for name, off in region.producers:
        r = output_ranges(gm.get_submodule(name))
        r1[off : off + r.numel()] = torch.maximum(r1[off : off + r.numel()], r)
    for name, off, width in region.consumers:
        r2[off : off + width] = torch.maximum(
            r2[off : off + width], input_ranges(gm.get_submodule(name), width)
        )
    return r1, r2


def scale_region_(
    gm: fx.GraphModule,
    region: Region,
    s: torch.Tensor,
    stats: dict,
    clips: list[tuple[ChannelMin, int]],
) -> None:
    """In place: each producer divides its channels by their slice of s, each consumer takes
    the inverse on the channels it reads, the region's ChannelMin bounds follow their channels;
    producers' BN statistics follow too."""
    for name, off in region.producers:
        m = gm.get_submodule(name)
        part = s[off : off + m.weight.shape[0]]
        scale_outputs_(m, part)
        if name in stats:
            stats[name] = stats[name].scaled(part)
    for name, off, width in region.consumers:
        scale_inputs_(gm.get_submodule(name), s[off : off + width])
    for clip, off in clips:
        clip.hi.div_(s[off : off + clip.hi.numel()])


def _joint_ranges(r1, r2, st, clips, n_std):
    """Per-channel ranges that also count the activation between the layers: each channel's
    first-layer range is the larger of its weight and activation ranges, each relative to its
    tensor's maximum (both scale by 1/s, and both are quantized per tensor)."""
    a = (st.mean + n_std * st.std).clamp_min(0)
    for clip in clips:
        a = torch.minimum(a, clip.hi.to(a.dtype))
    norm = lambda r: r / r.max().clamp_min(torch.finfo(r.dtype).tiny)  # noqa: E731
    return torch.maximum(norm(r1), norm(a).to(r1.dtype)), norm(r2)


def split_clip_(gm: fx.GraphModule, node: fx.Node, like: torch.Tensor) -> None:
    """In place: turn a clip node (ReLU6, hardtanh(0, b)) into F.relu followed by ChannelMin(b),
    with one bound per channel of `like` (in its dtype, so float64 models stay float64)."""
    act = activation_of(gm, node)
    node.op, node.target, node.args, node.kwargs = "call_function", F.relu, node.args[:1], {}
    name = f"{node.name}_clip"
    gm.add_submodule(name, ChannelMin(torch.full_like(like, float(act.hi))))
    with gm.graph.inserting_after(node):
        clip = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(clip, delete_user_cb=lambda u: u is not clip)


def _with_split_clips(gm: fx.GraphModule, regions: bool) -> tuple[list[Pair], dict[str, str]]:
    """Split every clip inside a pair (and, with `regions`, inside a region) into ReLU +
    ChannelMin (in place), then find the pairs again."""
    pairs, _ = find_pairs(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in pairs:
        for name in p.clips:
            if activation_of(gm, nodes[name]).kind != "channel_min":
                split_clip_(gm, nodes[name], output_ranges(gm.get_submodule(p.first)))
    if regions:
        like = torch.zeros(0, dtype=next(iter(gm.parameters()), torch.zeros(())).dtype)
        nodes = {n.name: n for n in gm.graph.nodes}
        for r in find_regions(gm)[0]:
            for name, off in r.clips:
                if activation_of(gm, nodes[name]).kind != "channel_min":
                    width = channels_of(gm, nodes[name], {})
                    split_clip_(gm, nodes[name], like.new_zeros(width))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return find_pairs(gm)


def equalize(
    gm: fx.GraphModule,
    stats: Stats,
    config: EqualizeConfig = EqualizeConfig(),
    search: Callable[..., Records] | None = None,
) -> Transformed:
    """Equalize every pair of `gm` (a copy) until the scales converge. `search` (e.g.
    dfq.transforms.equalize_search.search_scales_ bound to data) may then move each pair's
    scale away from the closed form: search(gm, pairs, total_scales, clips, stats) -> info."""
    gm = copy.deepcopy(gm)
    pairs, skipped = _with_split_clips(gm, config.residual_regions)
    nodes = {n.name: n for n in gm.graph.nodes}
    clips = {p.first: [gm.get_submodule(nodes[c].target) for c in p.clips] for p in pairs}
    new_stats = dict(stats)
    before = {p.first: output_ranges(gm.get_submodule(p.first)) for p in pairs}
    total = {p.first: torch.ones_like(before[p.first]) for p in pairs}
    regions, region_skipped = find_regions(gm) if config.residual_regions else ([], {})
    region_clips = [
        [(gm.get_submodule(nodes[name].target), off) for name, off in r.clips] for r in regions
    ]
    region_before = [_region_ranges(gm, r)[0] for r in regions]
    sweeps = 0
    for sweeps in range(1, config.max_iterations + 1):
        worst = 0.0
        for r, r_clips in zip(regions, region_clips):
            r1, r2 = _region_ranges(gm, r)
            s = equalization_scales(r1, r2)
            scale_region_(gm, r, s, new_stats, r_clips)
            worst = max(worst, float(s.log().abs().max()))
        for p in pairs:
            first, second = gm.get_submodule(p.first), gm.get_submodule(p.second)
            r1 = output_ranges(first)
            r2 = input_ranges(second, r1.numel())
            if config.activation_aware and p.first in new_stats:
                r1, r2 = _joint_ranges(
                    r1, r2, new_stats[p.first], clips[p.first], config.activation_std
                )
            s = equalization_scales(r1, r2)
            scale_pair_(first, second, s)
            for clip in clips[p.first]:
                clip.hi.div_(s)
            total[p.first] *= s
            if p.first in new_stats:
                new_stats[p.first] = new_stats[p.first].scaled(s)
            worst = max(worst, float(s.log().abs().max()))
        if worst < config.threshold:
            break
    searched = search(gm, pairs, total, clips, new_stats) if search is not None else {}
    info = _report(gm, pairs, skipped, before, total, sweeps)
    for name, found in searched.items():
        info[name].merge(found)
    for i, (r, r1) in enumerate(zip(regions, region_before)):
        after = _region_ranges(gm, r)[0]
        for name, _ in r.producers:
            info.setdefault(name, LayerRecord()).merge(
                LayerRecord(
                    equalized=True,
                    equalized_region=f"{r.kind} region {i}: {len(r.producers)} producers, "
                    f"{len(r.consumers)} consumers",
                    region_spread_before=_spread(r1),
                    region_spread_after=_spread(after),
                )
            )
            del info[name].equalize_note
    for add, why in region_skipped.items():
        info[add] = LayerRecord(equalize_note=f"region not equalized: {why}")
    for p in pairs:
        if clips[p.first]:
            info[p.first].kept_clip = "ReLU6 kept as ReLU + per-channel bounds"
    return Transformed(gm, freeze(new_stats), info)


def _rounded(r: torch.Tensor) -> list[float]:
    """Per-channel ranges for the report and plots (4 significant digits keep the JSON small)."""
    return [float(f"{v:.4g}") for v in r.tolist()]


def _spread(r: torch.Tensor) -> float:
    """max / median channel range: 1 is perfectly balanced."""
    med = float(r.median())
    return float(r.max()) / med if med > 0 else float("inf")


def _report(gm, pairs: list[Pair], skipped: dict[str, str], before, total, sweeps) -> Records:
    info: Records = {
        name: LayerRecord(equalized=False, equalize_note=why) for name, why in skipped.items()
    }
    for p in pairs:
        after = output_ranges(gm.get_submodule(p.first))
        info[p.first] = LayerRecord(
            equalized=True,
            equalized_with=p.second,
            equalize_sweeps=sweeps,
            range_spread_before=_spread(before[p.first]),
            range_spread_after=_spread(after),
            channel_ranges_before=_rounded(before[p.first]),
            channel_ranges_after=_rounded(after),
            scale_min=float(total[p.first].min()),
            scale_max=float(total[p.first].max()),
        )
    return info
