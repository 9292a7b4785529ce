"""Data-free statistics of every tensor in the graph, from the BatchNorm statistics alone.

Each node's output gets per-channel moments (mean, var) of a normal approximation and a
range [lo, hi]. Conv outputs with folded BN are N(beta, gamma^2); clipping activations map
moments through the clipped normal (exact for a normal input); smooth activations (SiLU, GELU,
Hardswish, ...) map them through the activation (dfq.statistics.activation_moments: exact for
a normal input; a clipped input is taken as the normal of its moments); residual adds sum means and
variances (independent branches); products (squeeze-excitation gates) multiply independent
factors; multiplying or adding a Python number maps them affinely; spatial means (timm's
squeeze-excitation x.mean((2, 3))) pass them through like pooling; concatenations stack
channels; layers without BN propagate moments linearly. Bias correction reads E[x] of each
layer input; BN-based activation ranges read mean +- n*std, clipped by the activation.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from dfq.config import RANGE_STD
from dfq.graph.channels import channel_matrix, to_features
from dfq.graph.lift import NotConstant, constant_value
from dfq.graph.ops import (
    activation_of,
    batchnorm_of,
    channel_padding,
    channel_slice,
    channel_split,
    is_add,
    is_cat,
    is_mul,
    is_pass_through,
    is_spatial_slice,
    pointwise_of,
    scalar_affine,
    weighted_module,
)
from dfq.statistics.activation_moments import activation_moments, activation_range, normal_pdf
from dfq.statistics.bn import Stats


@dataclass(frozen=True)
class Moments:
    """Per-channel moments and range of one tensor (1-D tensors over channels)."""

    mean: torch.Tensor
    var: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    # for a clipped tensor: the normal it was clipped from and the bounds so far, so that a
    # second clip (ReLU then ChannelMin) is computed from the normal, not from a normal fit
    clipped_from: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def clipped_normal_moments(mean: torch.Tensor, std: torch.Tensor, lo, hi):
    """Mean and variance of clamp(X, lo, hi) for X ~ N(mean, std^2), per channel.

    E = lo*P(X<lo) + hi*P(X>hi) + mean*P_in + std*(phi(a) - phi(b)), a, b the standardised
    bounds; lo and hi are floats or per-channel tensors, infinite bounds contribute nothing;
    std == 0 gives clamp(mean).
    """
    lo_t = torch.as_tensor(lo, dtype=mean.dtype).expand_as(mean)
    hi_t = torch.as_tensor(hi, dtype=mean.dtype).expand_as(mean)
    s = std.clamp_min(torch.finfo(std.dtype).tiny)
    a = (lo_t - mean) / s
    b = (hi_t - mean) / s
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    pa, pb = normal_pdf(a), normal_pdf(b)
    p_in = cdf_b - cdf_a
    lo_f = torch.where(torch.isinf(lo_t), torch.zeros_like(lo_t), lo_t)
    hi_f = torch.where(torch.isinf(hi_t), torch.zeros_like(hi_t), hi_t)
    a_pa = torch.where(torch.isinf(a), torch.zeros_like(a), a * pa)
    b_pb = torch.where(torch.isinf(b), torch.zeros_like(b), b * pb)
    e1 = lo_f * cdf_a + hi_f * (1 - cdf_b) + mean * p_in + s * (pa - pb)
    e2 = (
        lo_f**2 * cdf_a
        + hi_f**2 * (1 - cdf_b)
        + (mean**2 + s**2) * p_in
        + 2 * mean * s * (pa - pb)
        + s**2 * (a_pa - b_pb)
    )
    var = (e2 - e1**2).clamp_min(0)
    degenerate = std <= 0
    e1 = torch.where(degenerate, torch.minimum(torch.maximum(mean, lo_t), hi_t), e1)
    var = torch.where(degenerate, torch.zeros_like(var), var)
    return e1, var


def normal(mean: torch.Tensor, var: torch.Tensor, n_std: float) -> Moments:
    sd = var.clamp_min(0).sqrt()
    return Moments(mean, var, mean - n_std * sd, mean + n_std * sd)


def _clip(src: Moments, lo, hi) -> Moments:
    """Moments of clamp(x, lo, hi), composing with an earlier clip of the same normal."""
    base_mean, base_std, base_lo, base_hi = src.clipped_from or (
        src.mean,
        src.var.sqrt(),
        torch.full_like(src.mean, -math.inf),
        torch.full_like(src.mean, math.inf),
    )
    lo_t = torch.maximum(base_lo, torch.as_tensor(lo, dtype=src.mean.dtype).expand_as(src.mean))
    hi_t = torch.minimum(base_hi, torch.as_tensor(hi, dtype=src.mean.dtype).expand_as(src.mean))
    mean, var = clipped_normal_moments(base_mean, base_std, lo_t, hi_t)
    return Moments(
        mean,
        var,
        torch.minimum(torch.maximum(src.lo, lo_t), hi_t),
        torch.minimum(torch.maximum(src.hi, lo_t), hi_t),
        (base_mean, base_std, lo_t, hi_t),
    )


def _linear(gm: fx.GraphModule, node: fx.Node, x: Moments, n_std: float) -> Moments:
    """A layer without BN statistics: moments pushed through its channel matrix."""
    m = weighted_module(gm, node)
    M = channel_matrix(m).detach()
    sq = m.weight.detach() ** 2
    Msq = sq if sq.dim() == 2 else channel_matrix(m, sq)
    mean = M @ to_features(m, x.mean).to(M.dtype)
    if m.bias is not None:
        mean = mean + m.bias.detach()
    var = Msq @ to_features(m, x.var).to(M.dtype)
    return normal(mean, var, n_std)


def propagate(
    gm: fx.GraphModule,
    stats: Stats,
    inputs: Moments,
    n_std: float = RANGE_STD,
    add_correlation: float = 0.0,
) -> dict[str, Moments]:
    """Moments of every node's output that can be derived without data (by node name).

    `add_correlation`: the correlation rho taken between the two operands of an add, per
    channel: Var = va + vb + 2 rho sa sb (0: independent branches, the paper's; a residual
    branch is computed from the stream it is added to, so it is not independent of it)."""
    out: dict[str, Moments] = {}
    pieces: dict[str, list[Moments]] = {}  # the parts of a channel split, by the split's name
    groups: dict[str, tuple[Moments, int]] = {}  # x.view(B, g, C/g, H, W): moments and g
    shuffled: set[str] = set()  # nodes holding a channel-shuffled (B, C/g, g, H, W) tensor
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        src = out.get(args[0].name) if args else None
        if node.op == "placeholder":
            out[node.name] = inputs
        elif weighted_module(gm, node) is not None:
            st = stats.get(node.target)
            if st is not None:
                out[node.name] = normal(st.mean.detach(), st.std.detach() ** 2, n_std)
            elif src is not None:
                out[node.name] = _linear(gm, node, src, n_std)
        elif (bn := batchnorm_of(gm, node)) is not None and not isinstance(bn[1], str):
            mean, std = bn[1].output_moments()  # a BN left unfolded: its own statistics
            out[node.name] = normal(mean.detach(), std.detach() ** 2, n_std)
        elif (
            node.op == "call_function"
            and node.target is operator.getitem
            and args
            and (args[0].name in pieces)
        ):
            if isinstance(node.args[1], int) and -len(pieces[args[0].name]) <= node.args[1] < len(
                pieces[args[0].name]
            ):
                out[node.name] = pieces[args[0].name][node.args[1]]
        elif (scaled := _constant_product(gm, node, out)) is not None:
            out[node.name] = scaled
        elif args and args[0].name in groups and _is_transpose_12(node):
            m, g = groups[args[0].name]  # ShuffleNet's channel shuffle: (B, C/g, g, H, W)
            c = m.mean.numel()
            order = torch.tensor([(k % g) * (c // g) + k // g for k in range(c)])
            out[node.name] = _channels(m, order)
            shuffled.add(node.name)
        elif src is None and not is_cat(node):  # cat takes a list of tensors
            continue
        elif src is not None and (g := _channel_groups_view(node, src.mean.numel())) is not None:
            groups[node.name] = (src, g)
        elif (
            args and args[0].name in shuffled and _is_reshape(node) and len(_shape_args(node)) == 4
        ):
            out[node.name] = src  # back to (B, C, H, W) after the shuffle
            shuffled.add(node.name)
        elif src is not None and (sizes := channel_split(node, src.mean.numel())) is not None:
            bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            pieces[node.name] = [_channels(src, slice(a, b)) for a, b in zip(bounds, bounds[1:])]
        elif src is not None and (part := channel_slice(node)) is not None:
            out[node.name] = _channels(src, part)
        elif src is not None and _is_channel_permute(node):
            out[node.name] = src  # NCHW <-> NHWC: the same channels (a Linear then reads them)
        elif src is not None and (ln := _layer_norm(gm, node, src.mean.numel())) is not None:
            out[node.name] = _normalised(src, *ln, n_std)
        elif (act := activation_of(gm, node)) is not None:
            out[node.name] = _clip(src, act.lo, act.hi)
        elif (f := pointwise_of(gm, node)) is not None:
            out[node.name] = Moments(
                *activation_moments(f.kind, f.param, src.mean, src.var),
                *activation_range(f.kind, f.param, src.lo, src.hi),
            )
        elif is_pass_through(gm, node) or is_spatial_slice(node):
            out[node.name] = src
            if args and args[0].name in shuffled:
                shuffled.add(node.name)
        elif (pads := channel_padding(node)) is not None:
            out[node.name] = _pad_channels(src, *pads)
        elif is_add(node) and len(args) == 2 and all(a.name in out for a in args):
            a, b = (out[x.name] for x in args)
            if a.mean.shape == b.mean.shape:
                cov = add_correlation * (a.var.clamp_min(0) * b.var.clamp_min(0)).sqrt()
                s = normal(a.mean + b.mean, a.var + b.var + 2 * cov, n_std)
                # interval sum bounds the normal approximation where the branches are clipped
                out[node.name] = Moments(
                    s.mean,
                    s.var,
                    torch.maximum(s.lo, a.lo + b.lo),
                    torch.minimum(s.hi, a.hi + b.hi),
                )
        elif (ab := scalar_affine(node)) is not None and math.isfinite(ab[0]):
            a, b = ab
            ends = (src.lo * a + b, src.hi * a + b)
            out[node.name] = Moments(
                src.mean * a + b, src.var * a * a, torch.minimum(*ends), torch.maximum(*ends)
            )
        elif is_mul(node) and len(args) == 2 and all(a.name in out for a in args):
            if (p := _product(*(out[a.name] for a in args))) is not None:
                out[node.name] = p
        elif is_cat(node) and all(isinstance(x, fx.Node) and x.name in out for x in node.args[0]):
            parts = [out[x.name] for x in node.args[0]]
            out[node.name] = Moments(
                *(torch.cat([getattr(p, f) for p in parts]) for f in ("mean", "var", "lo", "hi"))
            )
    return out


def _is_reshape(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("view", "reshape")


def _shape_args(node: fx.Node) -> tuple:
    shape = node.args[1:]
    return tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape


def _channel_groups_view(node: fx.Node, channels: int) -> int | None:
    """g for x.view(B, g, C // g, H, W) (the first step of a channel shuffle), else None."""
    if not _is_reshape(node):
        return None
    shape = _shape_args(node)
    if len(shape) != 5 or not isinstance(shape[1], int) or shape[1] < 1 or channels % shape[1]:
        return None
    return shape[1]


def _is_transpose_12(node: fx.Node) -> bool:
    if not (
        (node.op == "call_function" and node.target is torch.transpose)
        or (node.op == "call_method" and node.target == "transpose")
    ):
        return False
    return tuple(node.args[1:3]) in ((1, 2), (2, 1))


def _channels(m: Moments, part: slice | torch.Tensor) -> Moments:
    return Moments(m.mean[part], m.var[part], m.lo[part], m.hi[part])


_CHANNEL_PERMUTES = ((0, 2, 3, 1), (0, 3, 1, 2))


def _is_channel_permute(node: fx.Node) -> bool:
    """x.permute(0, 2, 3, 1) and back (ConvNeXt's channels-last blocks)."""
    if not (
        (node.op == "call_method" and node.target == "permute")
        or (node.op == "call_function" and node.target is torch.permute)
    ):
        return False
    dims = node.args[1:] if len(node.args) > 2 else node.args[1:2] or (node.kwargs.get("dims"),)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    return tuple(dims) in _CHANNEL_PERMUTES


def _layer_norm(gm: fx.GraphModule, node: fx.Node, channels: int):
    """(gamma, beta, eps) of a LayerNorm over the channels alone (last dim), else None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is not torch.nn.LayerNorm or tuple(m.normalized_shape) != (channels,):
            return None
        return m.weight, m.bias, m.eps
    if node.op != "call_function" or node.target is not F.layer_norm:
        return None
    try:
        bound = inspect.signature(F.layer_norm).bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        shape, weight, bias = (
            constant_value(gm, a[k]) for k in ("normalized_shape", "weight", "bias")
        )
    except (TypeError, NotConstant):
        return None
    if tuple(shape) != (channels,):
        return None
    return weight, bias, a["eps"]


def _normalised(x: Moments, gamma, beta, eps: float, n_std: float) -> Moments:
    """LayerNorm over the channels, per pixel: x_c is standardised by the channels' pooled
    mean mu and variance s2 = mean_c(var_c + (mean_c - mu)^2) (taken as constants), then
    scaled by gamma and shifted by beta; |x_hat| <= sqrt(C - 1) bounds the range."""
    mean, var = x.mean.double(), x.var.double()
    mu = mean.mean()
    s = torch.sqrt((var + (mean - mu) ** 2).mean() + eps)
    g = torch.ones_like(mean) if gamma is None else gamma.detach().double()
    b = torch.zeros_like(mean) if beta is None else beta.detach().double()
    out = normal(g * (mean - mu) / s + b, g * g * var / (s * s), n_std)
    bound = g.abs() * math.sqrt(max(mean.numel() - 1, 1))
    lo, hi = torch.maximum(out.lo, b - bound), torch.minimum(out.hi, b + bound)
    return Moments(*(t.to(x.mean.dtype) for t in (out.mean, out.var, lo, hi)))


def _constant_product(gm: fx.GraphModule, node: fx.Node, out: dict[str, Moments]) -> Moments | None:
    """x * c with c a constant tensor (a parameter, e.g. ConvNeXt's layer scale) of one value
    per channel or one in all: the moments scaled channel by channel."""
    if not is_mul(node) or len(node.args) != 2:
        return None
    for x, c in (node.args, node.args[::-1]):
        if isinstance(x, fx.Node) and x.name in out and isinstance(c, fx.Node):
            try:
                value = constant_value(gm, c)
            except NotConstant:
                return None
            m = out[x.name]
            if not isinstance(value, torch.Tensor) or value.numel() not in (1, m.mean.numel()):
                return None
            v = value.detach().reshape(-1).to(m.mean.dtype)
            ends = (m.lo * v, m.hi * v)
            return Moments(m.mean * v, m.var * v * v, torch.minimum(*ends), torch.maximum(*ends))
    return None


def _product(a: Moments, b: Moments) -> Moments | None:
    """x * gate: E[XY] = E[X] E[Y], Var[XY] = E[X^2] E[Y^2] - E[X]^2 E[Y]^2 (factors taken as
    independent, which a gate computed from x is not quite), range from the corner products.
    A per-tensor factor (one channel, e.g. a spatial gate) broadcasts; other shapes give None.

    A squeeze-excitation gate reads a global average pool, which carries the pixel moments
    through unchanged (a pass-through op): the pooled mean is the channel mean, but its true
    variance is smaller (pixels average out, by up to 1/HW). Keeping the pixel variance is the
    conservative choice: gate ranges come out wider, never narrower, than the data's."""
    if a.mean.numel() != b.mean.numel() and 1 not in (a.mean.numel(), b.mean.numel()):
        return None
    var = a.var * b.var + a.var * b.mean**2 + b.var * a.mean**2
    corners = torch.stack(
        torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi)
    )
    return Moments(a.mean * b.mean, var, corners.amin(0), corners.amax(0))


def _pad_channels(m: Moments, before: int, after: int) -> Moments:
    """Zero channels (mean, var, range all 0) added by a channel-padding op."""

    def pad(t):
        return torch.cat([t.new_zeros(before), t, t.new_zeros(after)])

    return Moments(pad(m.mean), pad(m.var), pad(m.lo), pad(m.hi))


def input_moments(mean: tuple[float, ...], std: tuple[float, ...], dtype=torch.float32) -> Moments:
    """A normalised image: ~N(0, 1) per channel, within [(0 - m)/s, (1 - m)/s]."""
    m = torch.tensor(mean, dtype=dtype)
    s = torch.tensor(std, dtype=dtype)
    return Moments(torch.zeros_like(m), torch.ones_like(m), (0 - m) / s, (1 - m) / s)
