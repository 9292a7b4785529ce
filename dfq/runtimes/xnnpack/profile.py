"""The XNNPACK profile: ExecuTorch's XNNPACK delegate runs the QDQ groups of a PT2E graph as
its qs8 kernels (signed int8 asymmetric activations, int8 symmetric weights per channel, int32
bias at s_in * s_w).

dfq's uint8 grids are the same numbers with the zero point moved by 128, so the simulation keeps
onnxruntime's grids and the exporter writes int8. XNNPACK's qs8 convolution requantizes the
exact int32 accumulator (bias included) with a float32 multiplier, round half to even, as
onnxruntime's QLinearConv does: measured equal on every value (a float convolution followed by
a quantizer differed at 7 of 8192), so each such convolution computes that (`requant`). Its
qs8 global mean rounds with the output zero point added first, which moves ties (MobileNetV3's
squeeze-excitation pools: 18 of 960 values at 4 x 4), and its multiplier is rounded to float32
once (EfficientNet-B0's 6 x 6 pools: 2 of 1344). Its qs8 add is fixed-point (`IntegerAdd`,
"xnnpack"): computed as a float add, 37 of MobileNetV2's 1300 images moved.
"""

from __future__ import annotations

from torch import fx

from dfq.config import QuantConfig
from dfq.graph.modules import GlobalAvgPool
from dfq.runtimes.cpu import qdq_grids
from dfq.runtimes.ort.profile import OrtProfile
from dfq.runtimes.xnnpack.runner import EXTRA


class XnnpackProfile(OrtProfile):
    name = "xnnpack"
    format = "pte"
    runtime_modules = ("executorch",)
    extra = EXTRA
    add_arithmetic = "xnnpack"

    def resolve(self, q: QuantConfig) -> QuantConfig:
        return qdq_grids(q, self.name, False)  # XNNPACK's qs8 kernels do not saturate pairs

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        done = super().make_exact_(gm)
        for name, m in gm.named_modules():
            if isinstance(m, GlobalAvgPool) and m.requant is not None:
                m.xnnpack_mean = True
                done[name] = "integer-exact (as XNNPACK's qs8 mean)"
        return done

    def describe(self, q: QuantConfig) -> dict:
        return {
            "target": self.name,
            "bits_weight": q.bits_weight,
            "note": "s8 activations (dfq's u8 grid, zero point - 128), s8 weights, int32 bias; "
            "integer requantization as XNNPACK's qs8 kernels",
        }
