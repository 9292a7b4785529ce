"""Integer-exact simulation of onnxruntime's QLinearConv (the `ort` target profile).

A float convolution of dequantized values followed by a quantizer rounds almost exactly like
the runtime, but not at rounding ties: onnxruntime requantizes the exact int32 accumulator
with a float32 multiplier, `round_half_even(float(acc) * (s_x * s_w / s_y))` clamped to the
grid (QLinearConv::Compute and MlasRequantizeOutput). A deep network like MobileNetV2 amplifies
the rare tie flips into a 2 % argmax disagreement, so with this profile each conv whose input
and output are quantized computes exactly that: the accumulator in float64 (exact for int32
sums), then the runtime's float32 rescale and rounding (`QuantizedConv2d.requant`).
"""
from __future__ import annotations

from torch import fx, nn

from dfq.graph.ops import activation_of, weighted_module
from dfq.quant.activations import input_quantizer
from dfq.quant.modules import ActQuant, QuantizedLayer, Requant


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
