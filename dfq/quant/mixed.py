"""Mixed precision: which layers get other bit widths than the config's, and what the model weighs.

Below 8 bits the first conv (it reads the raw image) and the last linear (its errors go straight
into the logits) cost far more accuracy per bit than the layers between, so `keep_first_last`
keeps both (weights and input activations) at more bits; `layer_bits` overrides any layer by an
fnmatch pattern on its module name. A layer's activation bits are those of the quantizer its
input is read from (what its integer kernel multiplies); a quantizer shared by several layers
takes the largest width any of them asks for.
"""

from __future__ import annotations

import fnmatch
import math

from torch import fx, nn

from dfq.config import Grid, QuantConfig
from dfq.errors import DfqError
from dfq.graph.layers import weighted_nodes
from dfq.quant.activations import input_quantizer
from dfq.records import LayerRecord, Records


def layer_bits(gm: fx.GraphModule, q: QuantConfig) -> dict[str, tuple[int | None, int | None]]:
    """{layer name: (weight bits, input-activation bits)} for the layers whose widths differ
    from the config's defaults (None: the default). A pattern that matches no layer is a
    DfqError naming it and listing some layer names."""
    names = [n.target for n in weighted_nodes(gm)]
    out: dict[str, tuple[int | None, int | None]] = {}
    if q.keep_first_last is not None and names:
        for name in dict.fromkeys((names[0], names[-1])):
            out[name] = (q.keep_first_last, q.keep_first_last)
    for pattern, w, a in q.layer_bits:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise DfqError(
                f"`layer_bits` pattern '{pattern}' matches no conv/linear layer (layers: {shown}).",
                "use fnmatch patterns on these module names",
            )
        for name in matched:
            out[name] = (w, a if a is not None else out.get(name, (None, None))[1])
    return out


def check_layer_bits(model: nn.Module, q: QuantConfig) -> None:
    """Fail early (before any distillation) when a --layer_bits pattern matches no layer."""
    if q.layer_bits:
        from dfq.graph.trace import trace

        layer_bits(trace(model), q)


def set_input_bits_(gm: fx.GraphModule, bits: dict[str, int]) -> Records:
    """In place, before any range is set: the quantizer each named layer reads its input from
    gets that many bits (the largest asked for when shared). Info: per layer, `bits_input`."""
    wanted: dict[int, tuple[object, int]] = {}
    info: Records = {}
    for node in weighted_nodes(gm):
        if node.target not in bits:
            continue
        aq = input_quantizer(gm, node)
        if aq is None:
            info[node.target] = LayerRecord(bits_input=None, note="its input is not quantized")
            continue
        prev = wanted.get(id(aq), (aq, 0))[1]
        wanted[id(aq)] = (aq, max(prev, bits[node.target]))
    for aq, b in wanted.values():
        aq.grid = Grid(b, aq.grid.symmetric)
    for node in weighted_nodes(gm):
        aq = input_quantizer(gm, node)
        if aq is not None:
            info.setdefault(node.target, LayerRecord()).bits_input = aq.grid.bits
    return info


def weight_size(layers: Records) -> dict[str, int]:
    """Bytes of the conv/linear weights at their bit widths (packed, biases and scales not
    counted) and in float32, from the pipeline's layer report (`shape`, `bits_weight`)."""
    bits = fp32 = 0
    for rec in layers.values():
        if rec.shape is None:
            continue
        n = math.prod(rec.shape)
        bits += n * (rec.bits_weight if rec.bits_weight is not None else 32)
        fp32 += n * 32
    return {"weight_bytes": math.ceil(bits / 8), "fp32_weight_bytes": fp32 // 8}
