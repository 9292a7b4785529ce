"""Integer-exact simulation of the int8 runtimes' layers (the `ort` and `ncnn` target profiles).

A float convolution of dequantized values followed by a quantizer rounds almost exactly like
the runtime, but not at rounding ties: onnxruntime requantizes the exact int32 accumulator
with a float32 multiplier, `round_half_even(float(acc) * (s_x * s_w / s_y))` clamped to the
grid (QLinearConv::Compute and MlasRequantizeOutput). A deep network like MobileNetV2 amplifies
the rare tie flips into a 2 % argmax disagreement, so with this profile each conv whose input
and output are quantized computes exactly that: the accumulator in float64 (exact for int32
sums), then the runtime's float32 rescale and rounding (`QuantizedConv2d.requant`).

ncnn returns float32 from each int8 layer: `acc * multiplier[c] + bias[c]` with multiplier =
1 / (s_in * s_w[c]) in ncnn's reciprocal scales. Read off ncnn 1.0.20261020 on x86 (bit for bit,
tests/test_export_ncnn.py): Convolution rounds once (FMA), InnerProduct and ConvolutionDepthWise
multiply then add, and the depthwise kernel for packed channels (a multiple of 8) uses an
approximate reciprocal that only ncnn itself can tell us (`dfq.targets.ncnn_depthwise_multipliers`).
Simulating that takes MobileNetV2 (1300 images) from 95.5 % to 100 % argmax agreement with ncnn,
with identical logits.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import fx, nn

from dfq.graph.ops import activation_of, is_depthwise, weighted_module
from dfq.quant.activations import input_quantizer
from dfq.quant.modules import ActQuant, Dequant, QuantizedLayer, Requant


def _output_quantizer(gm: fx.GraphModule, node: fx.Node) -> ActQuant | None:
    """The quantizer right after `node`, or after the one activation that follows it."""
    users = list(node.users)
    if len(users) == 1 and activation_of(gm, users[0]) is not None:
        users = list(users[0].users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    aq = gm.get_submodule(users[0].target)
    return aq if isinstance(aq, ActQuant) and not aq.observing else None


def make_integer_exact_(gm: fx.GraphModule) -> list[str]:
    """In place: every int8 conv with a quantized input and output (and an int32 bias)
    computes like QLinearConv. Returns the layers it applies to."""
    done = []
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if not (isinstance(m, QuantizedLayer) and isinstance(m, nn.Conv2d)):
            continue
        if m.bias is not None and (m.bias_grid is None or m.bias_grid.bits != 32):
            continue
        in_q, out_q = input_quantizer(gm, node), _output_quantizer(gm, node)
        if in_q is None or out_q is None:
            continue
        m.requant = Requant(in_q.scale.detach().clone(), out_q.scale.detach().clone(), int(out_q.zero_point),
                            out_q.grid.qmin, out_q.grid.qmax)
        done.append(node.target)
    return done


def make_ncnn_exact_(gm: fx.GraphModule) -> dict[str, str]:
    """In place: every int8 layer with a quantized input computes its float32 output as ncnn
    does. Returns {layer: how its multipliers were obtained}."""
    from dfq.targets import ncnn_depthwise_multipliers, ncnn_weight_scales

    done = {}
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if not isinstance(m, QuantizedLayer) or getattr(m, "padding_mode", "zeros") != "zeros":
            continue
        in_q = input_quantizer(gm, node)
        if in_q is None:
            continue
        w_inv = ncnn_weight_scales(m)
        mult, how = 1.0 / (in_q.inv_scale().float() * w_inv), "exact reciprocal"  # float32, as ncnn
        depthwise = is_depthwise(m)
        if depthwise and m.out_channels % 8 == 0:
            if importlib.util.find_spec("ncnn") is not None:
                mult = torch.from_numpy(ncnn_depthwise_multipliers(float(in_q.inv_scale()), w_inv.numpy()))
                how = "read off ncnn (approximate reciprocal of the packed depthwise kernel)"
            else:
                how = "exact reciprocal (ncnn not installed: its packed depthwise kernel rounds differently)"
        mult = torch.where(w_inv == 0, torch.zeros_like(mult), mult).float()
        fused = isinstance(m, nn.Conv2d) and not depthwise
        m.dequant = Dequant(in_q.scale.detach().clone(), mult, fused)
        done[node.target] = how
    return done
