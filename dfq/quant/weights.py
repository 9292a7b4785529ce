"""Weight quantization: every conv/linear becomes a Quantized* layer on its integer grid."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import fx, nn

from dfq.config import QuantConfig
from dfq.graph.layers import weighted_nodes
from dfq.quant.modules import quantized_copy
from dfq.quant.primitives import qparams, quantize, sqnr_db
from dfq.records import LayerRecord, Records, Transformed
from dfq.statistics.bn import Stats


def weight_qparams(
    w: torch.Tensor, config: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Scale, zero point and axis for a weight: per tensor, or per output channel."""
    if config.per_channel:
        flat = w.detach().flatten(1)
        scale, zp = qparams(flat.amin(1), flat.amax(1), config.weight_grid)
        return scale, zp, 0
    scale, zp = qparams(w.detach().min(), w.detach().max(), config.weight_grid)
    return scale, zp, None


WeightBits = Callable[[QuantConfig, nn.Module], int]


def layer_config(
    config: QuantConfig,
    m: nn.Module,
    weight_bits: WeightBits | None = None,
    bits: int | None = None,
) -> QuantConfig:
    """The config for one layer: `bits` when the user set this layer's width (dfq.quant.mixed),
    and a runtime profile may give some layers fewer weight bits."""
    base = config if bits is None else dataclasses.replace(config, bits_weight=bits)
    b = base.bits_weight if weight_bits is None else weight_bits(base, m)
    return base if b == base.bits_weight else dataclasses.replace(base, bits_weight=b)


def _replace(gm: fx.GraphModule, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, new)


def quantize_weights(
    gm: fx.GraphModule,
    stats: Stats,
    config: QuantConfig,
    weight_bits: WeightBits | None = None,
    layer_bits: dict[str, int] | None = None,
) -> Transformed:
    """Return a copy of `gm` whose conv/linear weights sit on the weight grid (`weight_bits`:
    a runtime profile's per-layer bit width; `layer_bits`: the user's, by layer name)."""
    gm = copy.deepcopy(gm)
    info: Records = {}
    for node in weighted_nodes(gm):
        m = gm.get_submodule(node.target)
        w = m.weight.detach()
        lc = layer_config(config, m, weight_bits, (layer_bits or {}).get(node.target))
        scale, zp, axis = weight_qparams(w, lc)
        q = quantized_copy(m)
        q.init_quant(quantize(w, scale, zp, lc.weight_grid, axis), scale, zp, lc.weight_grid, axis)
        _replace(gm, node.target, q)
        info[node.target] = LayerRecord(
            bits_weight=lc.bits_weight,
            weight_sqnr_db=round(sqnr_db(w, q.weight), 2),
            weight_range=[float(w.min()), float(w.max())],
        )
    gm.recompile()
    return Transformed(gm, stats, info)
