"""Equalization scales chosen on data (the open question of the DFQ paper's section 4.1).

The closed form s = sqrt(r1 / r2) balances the two weight ranges of a pair, which is the best
joint *per-tensor weight* precision but says nothing about the activation between the layers,
per-channel grids or where the error actually lands. Here each pair's closed-form scale S
(what equalization applied in all) is raised to a power t -- t = 0 undoes it, t = 1 is the
closed form -- and the t whose quantized pair (both weights on their grids, the activation
between on a per-tensor grid of its range on the data) reproduces the float pair's output on
the data with the least squared error is kept. Pairs are visited in graph order, each on the
inputs the (already searched) model gives it. The float function never changes. The grids are
the config's (`--layer_bits` overrides are not seen by the search).
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.func import functional_call

from dfq.config import QuantConfig
from dfq.errors import DfqError
from dfq.graph.layers import Pair
from dfq.graph.subgraph import subgraph
from dfq.quant.primitives import fake_quantize, qparams
from dfq.quant.weights import weight_qparams
from dfq.records import LayerRecord, Records
from dfq.statistics.bn import Stats
from dfq.transforms.equalize import scale_pair_

POWERS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5)  # t of S**t; 1 = the closed form


class _Stop(Exception):
    """Raised by the input hook: the rest of the forward pass is not needed."""


def _inputs_of(gm: fx.GraphModule, name: str, data: list[torch.Tensor]) -> torch.Tensor:
    seen: list[torch.Tensor] = []

    def hook(mod, inputs):
        seen.append(inputs[0].detach())
        raise _Stop

    handle = gm.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for x in data:
                try:
                    gm(x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(seen)


def _path(gm: fx.GraphModule, pair: Pair) -> list[fx.Node]:
    """The nodes from the first layer to the second (single users all the way)."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    cur, path = nodes[pair.first], [nodes[pair.first]]
    while cur is not nodes[pair.second]:
        users = [u for u in cur.users if u.op != "output"]
        if not users:
            raise DfqError(f"equalization search: no path from {pair.first} to {pair.second}.")
        cur = users[0]
        path.append(cur)
    return path


def _fake_weight(m: nn.Module, quant: QuantConfig) -> torch.Tensor:
    scale, zp, axis = weight_qparams(m.weight, quant)
    return fake_quantize(m.weight.detach(), scale, zp, quant.weight_grid, axis)


def _pair_error(chain: fx.GraphModule, pair: Pair, x: torch.Tensor, quant: QuantConfig) -> float:
    """Squared error of the quantized pair against the float pair on `x` (per element)."""
    second = chain.get_submodule(pair.second)
    seen: list[torch.Tensor] = []
    grab = second.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0]))
    try:
        with torch.no_grad():
            ref = chain(x)
    finally:
        grab.remove()
    mid = seen[0]
    scale, zp = qparams(mid.min(), mid.max(), quant.activation_grid)

    def quantize_input(mod, inp):
        return (fake_quantize(inp[0], scale, zp, quant.activation_grid),)

    over = {
        f"{pair.first}.weight": _fake_weight(chain.get_submodule(pair.first), quant),
        f"{pair.second}.weight": _fake_weight(second, quant),
    }
    hook = second.register_forward_pre_hook(quantize_input)
    try:
        with torch.no_grad():
            out = functional_call(chain, over, (x,))
    finally:
        hook.remove()
    return float((out - ref).double().pow(2).mean())


def search_scales_(
    gm: fx.GraphModule,
    pairs: list[Pair],
    total: dict[str, torch.Tensor],
    clips: dict[str, list[nn.Module]],
    stats: dict[str, Stats],
    data: list[torch.Tensor],
    quant: QuantConfig,
    powers: tuple[float, ...] = POWERS,
) -> Records:
    """In place: per pair, move from the closed form S to S**t with the best t (see the
    module's docstring); `total`, the ChannelMin bounds and `stats` follow. Info per pair: t,
    and the pair's quantized output MSE at the closed form and at t."""
    info: Records = {}
    for pair in pairs:
        first, second = gm.get_submodule(pair.first), gm.get_submodule(pair.second)
        x = _inputs_of(gm, pair.first, data)
        path = _path(gm, pair)
        chain = subgraph(gm, path, path[0].args[0], path[-1])
        errors = {}
        for t in powers:
            s = total[pair.first] ** (t - 1.0)
            saved = (
                first.weight.detach().clone(),
                None if first.bias is None else first.bias.detach().clone(),
                second.weight.detach().clone(),
                [c.hi.clone() for c in clips[pair.first]],
            )
            scale_pair_(first, second, s)
            for c in clips[pair.first]:
                c.hi.div_(s)
            errors[t] = _pair_error(chain, pair, x, quant)
            with torch.no_grad():
                first.weight.copy_(saved[0])
                if first.bias is not None:
                    first.bias.copy_(saved[1])
                second.weight.copy_(saved[2])
                for c, hi in zip(clips[pair.first], saved[3]):
                    c.hi.copy_(hi)
        best = min(errors, key=lambda t: (errors[t], abs(t - 1.0)))
        if best != 1.0:
            s = total[pair.first] ** (best - 1.0)
            scale_pair_(first, second, s)
            for c in clips[pair.first]:
                c.hi.div_(s)
            total[pair.first] = total[pair.first] * s
            if pair.first in stats:
                stats[pair.first] = stats[pair.first].scaled(s)
        info[pair.first] = LayerRecord(
            equalize_power=best, pair_mse_closed_form=errors[1.0], pair_mse_chosen=errors[best]
        )
    return info
