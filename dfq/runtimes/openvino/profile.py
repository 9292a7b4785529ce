"""The OpenVINO profile: ONNX QDQ read by OpenVINO, whose CPU plugin runs the quantized
convolutions, matrix products and adds as int8 kernels.

OpenVINO reads the same QDQ graph onnxruntime does (uint8 asymmetric activations, int8
symmetric weights, int32 bias at s_in * s_w) but computes it its own way, measured against
openvino 2026.4 on x86 (tests/test_export_openvino.py):
- each int8 convolution / matrix product dequantizes its exact int32 sum in float32,
  `acc * (s_in * s_w[c]) + bias[c]` (the `Dequant` arithmetic of `QuantizedConv2d`), and the
  next quantizer is a FakeQuantize whose float32 steps are not `round(x / s)`
  (`ActQuant.fake_quantize_op`): together they flip none of MobileNetV2's early layers' values;
- a residual add whose first suitable operand is a convolution's only output is fused into that
  convolution (the CPU plugin's sum post-op), and the convolution's own output quantizer is
  dropped: the add reads it unrounded. So that output is no quantization point here, and the
  report says so on the convolution (`sum_fused_outputs`);
- global average pools run on the integers (u8 Reduce), as onnxruntime's.
No `reduce_range`: oneDNN's int8 kernels do not saturate u8*s8 pairs.
"""

from __future__ import annotations

from torch import fx, nn

from dfq.config import QuantConfig
from dfq.graph.ops import activation_of, is_add, weighted_module
from dfq.quant.activations import default_quantization_points, grid_source, input_quantizer
from dfq.quant.modules import ActQuant, Dequant, QuantizedLayer
from dfq.runtimes.base import Runtime
from dfq.runtimes.cpu import qdq_grids
from dfq.runtimes.openvino.runner import EXTRA
from dfq.runtimes.ort.profile import exact_global_pools_


class OpenVinoProfile(Runtime):
    name = "openvino"
    format = "openvino"
    runtime_modules = ("onnx", "onnxscript", "openvino")
    extra = EXTRA

    def resolve(self, q: QuantConfig) -> QuantConfig:
        return qdq_grids(q, self.name, bool(q.reduce_range))

    def quantization_points(self, gm: fx.GraphModule) -> list[fx.Node]:
        """dfq's points, less the convolution outputs OpenVINO adds into a residual unrounded."""
        fused = set(sum_fused_outputs(gm).values())
        return [p for p in default_quantization_points(gm) if p not in fused]

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        """Every int8 layer dequantizes its exact int32 sum in float32, every quantizer runs
        as OpenVINO's FakeQuantize, global pools between quantizers run on the integers."""
        done = {}
        for node in gm.graph.nodes:
            m = weighted_module(gm, node)
            in_q = input_quantizer(gm, node) if isinstance(m, QuantizedLayer) else None
            if in_q is None:
                continue
            mult = (in_q.scale.float() * m.weight_scale.float()).reshape(-1)
            m.dequant = Dequant(
                in_q.scale.detach().clone(), mult.expand(m.weight.shape[0]).clone(), False
            )
            done[node.target] = "integer-exact (int32 sum, float32 dequantization as OpenVINO)"
        for mod in gm.modules():
            if isinstance(mod, ActQuant) and mod.quantizing:
                mod.fake_quantize_op = True
        for add, out in sum_fused_outputs(gm).items():
            conv = out if weighted_module(gm, out) is not None else out.args[0]
            done[conv.target] = (
                f"output not quantized: OpenVINO computes {add.name} inside this convolution "
                "(a sum post-op) and rounds only the sum"
            )
        return {**done, **exact_global_pools_(gm)}

    def describe(self, q: QuantConfig) -> dict:
        return {
            "target": self.name,
            "bits_weight": q.bits_weight,
            "note": "u8 activations, s8 weights, int32 bias; float32 dequantization, FakeQuantize "
            "rounding, residual adds fused into convolutions",
        }


def sum_fused_outputs(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """{add: the convolution output (after its fused activation) OpenVINO's CPU plugin fuses
    that add into}: the add's first operand that is a Conv2d's only output and whose other
    operand is not that convolution's own input (the plugin writes the sum in place).
    Measured: tests/test_export_openvino.py, nets with each case."""
    fused = {}
    for add in gm.graph.nodes:
        if not is_add(add) or len(add.args) != 2:
            continue
        operands = list(add.args)
        if not all(isinstance(a, fx.Node) for a in operands):
            continue
        for i, out in enumerate(operands):
            conv = out.args[0] if activation_of(gm, out) is not None and out.args else out
            is_conv = isinstance(conv, fx.Node) and isinstance(weighted_module(gm, conv), nn.Conv2d)
            if not is_conv:
                continue
            if len(out.users) != 1 or (conv is not out and len(conv.users) != 1):
                continue
            if grid_source(gm, conv.args[0]) is grid_source(gm, operands[1 - i]):
                continue
            fused[add] = out
            break
    return fused
