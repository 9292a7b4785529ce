"""The ncnn profile: ncnn's int8 layers (src/layer/convolution.cpp, tools/quantize/ncnn2table.cpp).

Symmetric int8 everywhere, scale = 127 / absmax, q = clamp(round(x * scale), -127, 127) with C's
round() (half away from zero) and a multiplication by the reciprocal scale; each
Convolution/ConvolutionDepthWise/InnerProduct quantizes its own input and returns fp32
(int32 * 1/(s_in*s_w[c]) + fp32 bias), so adds, pools and concats run in float and biases are
never quantized. ncnn2table gives 3x3 stride-1 Convolution weights 6 bits (31 / absmax) because
ncnn's int8 winograd F(4,3) needs them; reduce_range does the same (default: off on x86, where
we measured 8-bit exact, on elsewhere).

Each int8 layer's float32 output is simulated bit for bit: `acc * multiplier[c] + bias[c]` with
multiplier = 1 / (s_in * s_w[c]) in ncnn's reciprocal scales. Read off ncnn 1.0.20261020 on x86
(tests/test_export_ncnn.py): Convolution rounds once (FMA), InnerProduct and ConvolutionDepthWise
multiply then add, and the depthwise kernel for packed channels (a multiple of 8) uses an
approximate reciprocal that only ncnn itself can tell us (`ncnn_depthwise_multipliers`).
Simulating that takes MobileNetV2 (1300 images) from 95.5 % to 100 % argmax agreement with ncnn,
with identical logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from dfq.config import QuantConfig
from dfq.graph.modules import GlobalAvgPool
from dfq.graph.ops import is_depthwise, is_global_pool, swap_for_module, weighted_module
from dfq.quant.activations import input_quantizer
from dfq.quant.modules import Dequant, QuantizedLayer
from dfq.records import LayerRecord, Records
from dfq.runtimes.base import Runtime
from dfq.runtimes.cpu import is_x86, require_int8
from dfq.runtimes.ncnn.runner import EXTRA, NcnnRunner

INT8_TAG = 0x000D4B38  # ncnn ModelBin / ncnn2int8.cpp fwrite_weight_tag_data: "int8 magic"


def is_ncnn_winograd(m: nn.Module) -> bool:
    """ncnn2table.cpp: kernel 3x3, dilation 1, stride 1 Convolution (not depthwise) -> 31/absmax."""
    return (
        isinstance(m, nn.Conv2d)
        and m.groups == 1
        and tuple(m.kernel_size) == (3, 3)
        and tuple(m.stride) == (1, 1)
        and tuple(m.dilation) == (1, 1)
    )


def ncnn_weight_scales(m: QuantizedLayer) -> torch.Tensor:
    """ncnn's float32 weight scale per output channel of a quantized layer: 127 / absmax, i.e.
    the reciprocal of dfq's (what the .bin holds and the int8 kernels multiply with)."""
    return (1.0 / m.weight_scale.float()).reshape(-1).expand(m.weight.shape[0]).contiguous()


def ncnn_depthwise_multipliers(in_scale: float, weight_scales) -> np.ndarray:
    """The float32 multipliers ncnn's int8 ConvolutionDepthWise dequantizes its int32 sums with,
    read off ncnn itself on this CPU.

    ncnn's x86 depthwise int8 kernel for packed channels (elempack 8: channels % 8 == 0) takes
    `_mm_rcp_ps(bottom_scale * weight_scale)`, an approximate reciprocal (12 bits, and not the
    same on every CPU), where the unpacked path divides exactly (convolutiondepthwise_x86.cpp,
    forward_int8_x86). Off by ~1e-4, it moves values across rounding boundaries of the next
    quantizer, and a deep network amplifies that (MobileNetV2: 95.5 % argmax agreement). So we
    ask ncnn: a 1x1 depthwise layer with the real scales, int8 weights 1 and an input that
    quantizes to 1 returns exactly the multiplier of each channel. `in_scale` and
    `weight_scales` are ncnn's (127 / absmax, i.e. dfq's reciprocal scales)."""
    ws = np.asarray(weight_scales, np.float32).reshape(-1)
    g = ws.size
    param = (
        "7767517\n2 2\n"
        f"Input in0 0 1 in0 0=1 1=1 2={g}\n"
        f"ConvolutionDepthWise dw 1 1 in0 out0 0={g} 1=1 11=1 2=1 12=1 3=1 13=1 4=0 14=0 5=0 "
        f"6={g} 7={g} 8=1\n"
    )
    blob = (
        struct.pack("<I", INT8_TAG)
        + np.ones(g, np.int8).tobytes()
        + b"\0" * (-g % 4)
        + ws.tobytes()
        + np.array([in_scale], np.float32).tobytes()
    )
    with tempfile.TemporaryDirectory(prefix="dfq_ncnn_probe_") as tmp:
        Path(tmp, "p.param").write_text(param)
        Path(tmp, "p.bin").write_bytes(blob)
        run = NcnnRunner(Path(tmp, "p.param"), Path(tmp, "p.bin"), threads=1)
        x = torch.full(
            (1, g, 1, 1), float(np.float32(1.0) / np.float32(in_scale))
        )  # quantizes to 1
        return run(x)[0].numpy().astype(np.float32).reshape(-1)


class NcnnProfile(Runtime):
    name = "ncnn"
    format = "ncnn"
    runtime_modules = ("ncnn", "pnnx")
    extra = EXTRA
    reciprocal_scales = True
    int32_bias_at_input_scale = False  # fp32 biases

    def resolve(self, q: QuantConfig) -> QuantConfig:
        require_int8(q)
        reduce = (not is_x86()) if q.reduce_range is None else q.reduce_range
        return dataclasses.replace(
            q, activation_symmetric=True, rounding="half_away", reduce_range=reduce
        )

    def weight_bits(self, q: QuantConfig, module: nn.Module) -> int:
        """ncnn2table's 6-bit rule for winograd-eligible convolutions (with reduce_range).
        Measured with ncnn 1.0.20261020 on x86 (AVX-512 VNNI), 3x3 stride-1 int8 convolutions
        with winograd on are exact with 8-bit weights (tests/test_export_ncnn.py)."""
        if q.reduce_range and is_ncnn_winograd(module):
            return min(q.bits_weight, 6)
        return q.bits_weight

    def quantization_points(self, gm: fx.GraphModule) -> list[fx.Node]:
        """The inputs of conv/linear layers only: ncnn quantizes inside each layer."""
        inputs = {n.args[0] for n in gm.graph.nodes if weighted_module(gm, n) is not None}
        return [n for n in gm.graph.nodes if n in inputs]

    def reads_quantized(self, gm: fx.GraphModule, user: fx.Node) -> bool:
        """Only the conv/linear layers see the int8 value, everything else the float one."""
        return weighted_module(gm, user) is not None

    def quantize_biases_(self, gm: fx.GraphModule, q: QuantConfig) -> Records:
        """ncnn adds the fp32 bias after dequantizing the int32 sum."""
        return {
            n.target: LayerRecord(bias="fp32 (ncnn)")
            for n in gm.graph.nodes
            if isinstance(weighted_module(gm, n), QuantizedLayer)
            and weighted_module(gm, n).bias is not None
        }

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        """Every int8 layer with a quantized input computes its float32 output as ncnn does."""
        done = {}
        for node in gm.graph.nodes:
            m = weighted_module(gm, node)
            if not isinstance(m, QuantizedLayer) or getattr(m, "padding_mode", "zeros") != "zeros":
                continue
            in_q = input_quantizer(gm, node)
            if in_q is None:
                continue
            w_inv = ncnn_weight_scales(m)
            mult, how = (
                1.0 / (in_q.inv_scale().float() * w_inv),
                "exact reciprocal",
            )  # float32, as ncnn
            depthwise = is_depthwise(m)
            if depthwise and m.out_channels % 8 == 0:
                if importlib.util.find_spec("ncnn") is not None:
                    mult = torch.from_numpy(
                        ncnn_depthwise_multipliers(float(in_q.inv_scale()), w_inv.numpy())
                    )
                    how = "read off ncnn (approximate reciprocal of the packed depthwise kernel)"
                else:
                    how = (
                        "exact reciprocal (ncnn not installed: its packed depthwise kernel "
                        "rounds differently)"
                    )
            mult = torch.where(w_inv == 0, torch.zeros_like(mult), mult).float()
            fused = isinstance(m, nn.Conv2d) and not depthwise
            m.dequant = Dequant(in_q.scale.detach().clone(), mult, fused)
            done[node.target] = f"integer-exact as ncnn; multipliers: {how}"
        for node in list(gm.graph.nodes):
            if is_global_pool(gm, node):
                pool = GlobalAvgPool()
                pool.ncnn_mean = True
                name = swap_for_module(gm, node, f"ncnn_{node.name}", pool, node.args[0])
                done[name] = "float32 as ncnn's Pooling (its sum order, times 1 / (H W))"
        gm.recompile()
        return done

    def describe(self, q: QuantConfig) -> dict:
        return {
            "target": "ncnn",
            "reduce_range": q.reduce_range,
            "note": "symmetric int8, scale 127/absmax, round half away, float adds/pools/bias"
            + (
                ", 6-bit weights for 3x3 stride-1 convolutions (ncnn2table, winograd)"
                if q.reduce_range
                else ""
            ),
        }
