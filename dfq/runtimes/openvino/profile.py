"""The OpenVINO profile: ONNX QDQ read by OpenVINO, whose CPU plugin runs the quantized
convolutions, matrix products and adds as int8 kernels.

OpenVINO reads the same QDQ graph onnxruntime does (uint8 asymmetric activations, int8
symmetric weights, int32 bias at s_in * s_w) but requantizes differently: its low-precision
transformations keep each output quantizer as a float FakeQuantize after the int32
accumulator is dequantized, so a float convolution of dequantized values followed by the
quantizer is what it computes (no QLinearConv integer requantization to copy, no
`reduce_range`: oneDNN's int8 kernels do not saturate u8*s8 pairs).
"""

from __future__ import annotations

from torch import fx

from dfq.config import QuantConfig
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

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        """Global average pools between quantizers run on the integers (the CPU plugin's u8
        Reduce): their exact mean, rounded half to even, as QLinearGlobalAveragePool's."""
        return exact_global_pools_(gm)

    def describe(self, q: QuantConfig) -> dict:
        return {
            "target": self.name,
            "bits_weight": q.bits_weight,
            "note": "u8 activations, s8 weights, int32 bias; float requantization (FakeQuantize)",
        }
