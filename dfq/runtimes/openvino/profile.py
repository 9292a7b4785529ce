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

import dataclasses

from torch import fx

from dfq.config import QuantConfig
from dfq.errors import DfqError
from dfq.runtimes.base import Runtime
from dfq.runtimes.cpu import require_int8
from dfq.runtimes.openvino.runner import EXTRA
from dfq.runtimes.ort.profile import exact_global_pools_


class OpenVinoProfile(Runtime):
    name = "openvino"
    format = "openvino"
    runtime_modules = ("onnx", "onnxscript", "openvino")
    extra = EXTRA

    def resolve(self, q: QuantConfig) -> QuantConfig:
        require_int8(q)
        if q.bits_bias != 32:
            raise DfqError(
                "`target`=openvino adds an int32 bias at s_in * s_w.", "use `bits_bias`=32"
            )
        reduce = bool(q.reduce_range)
        return dataclasses.replace(
            q,
            activation_symmetric=False,
            rounding="half_even",
            reduce_range=reduce,
            bits_weight=min(q.bits_weight, 7) if reduce else q.bits_weight,
        )

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
