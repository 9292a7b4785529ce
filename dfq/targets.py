"""Runtime profiles: make the simulation compute what an int8 runtime will compute.

`QuantConfig.target` names the runtime; `resolve(config)` turns it into concrete grids, rounding
and quantization points before the pipeline quantizes anything, so the fake-quant model *is*
the integer model the exporter writes (dfq/export/).

generic  what the config says (defaults: int8 symmetric weights, uint8 activations, int32 bias).
ort      onnxruntime QDQ -> QLinearConv/QLinearAdd/...: uint8 asymmetric activations, int8
         symmetric weights, int32 bias at s_in * s_w, QuantizeLinear's round-half-to-even.
         On x86 CPUs without VNNI, MLAS's u8s8 GEMM multiplies with vpmaddubsw, which adds two
         u8*s8 products into a saturating int16 (255*127*2 > 32767): onnxruntime's own answer is
         "reduce_range", 7-bit weights, and so is ours (`reduce_range=None` probes the CPU).
ncnn     ncnn int8 (src/layer/convolution.cpp, tools/quantize/ncnn2table.cpp): symmetric int8
         everywhere, scale = 127 / absmax, q = clamp(round(x * scale), -127, 127) with C's
         round() (half away from zero) and a multiplication by the reciprocal scale; each
         Convolution/ConvolutionDepthWise/InnerProduct quantizes its own input and returns
         fp32 (int32 * 1/(s_in*s_w[c]) + fp32 bias), so adds, pools and concats run in float and
         biases are never quantized. Each int8 layer's float32 output is simulated bit for bit
         (dfq.quant.integer_exact). ncnn2table gives 3x3 stride-1 Convolution weights 6 bits
         (31 / absmax) because ncnn's int8 winograd F(4,3) needs them; reduce_range does the
         same (default: off on x86, where we measured 8-bit exact, on elsewhere).
"""
from __future__ import annotations

import dataclasses
import functools
import platform
import struct
from pathlib import Path

from dfq.config import QuantConfig
from dfq.errors import DfqError


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def ort_saturates() -> bool:
    """Does onnxruntime's u8s8 GEMM saturate on this CPU? Asked of onnxruntime itself where it
    is installed (a 64-deep MatMulInteger of 255 x 127), else read from the CPU flags (x86
    without VNNI saturates)."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return _x86() and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
    k, n, m = 64, 16, 8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(np.full((k, n), 127, np.int8), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"a": np.full((m, k), 255, np.uint8)})[0]
    return int(y.min()) != 255 * 127 * k


def resolve(q: QuantConfig) -> QuantConfig:
    """The concrete QuantConfig a target computes with (idempotent; generic is unchanged)."""
    if q.target == "generic":
        return q
    if q.bits_activation != 8 or q.bits_weight > 8:
        raise DfqError(f"--target {q.target} runs int8: W{q.bits_weight}A{q.bits_activation} cannot be exported.",
                       "use --bits_weight <= 8 and --bits_activation 8, or --target generic")
    if not q.weight_symmetric:
        raise DfqError(f"--target {q.target} uses symmetric int8 weights.", "drop --asymmetric_weight")
    if q.target == "ort":
        if q.bits_bias != 32:
            raise DfqError("--target ort adds an int32 bias at s_in * s_w.", "use --bits_bias 32")
        reduce = ort_saturates() if q.reduce_range is None else q.reduce_range
        return dataclasses.replace(q, activation_symmetric=False, rounding="half_even", reduce_range=reduce,
                                   bits_weight=min(q.bits_weight, 7) if reduce else q.bits_weight)
    # ncnn: reduce_range = ncnn2table's 6-bit weights for winograd-eligible convolutions
    reduce = (not _x86()) if q.reduce_range is None else q.reduce_range
    return dataclasses.replace(q, activation_symmetric=True, rounding="half_away", reduce_range=reduce)


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def weight_bits(q: QuantConfig, module) -> int:
    """Per-layer weight bit width: ncnn2table's 6-bit rule for winograd-eligible convolutions
    (with the ncnn profile's reduce_range). Measured with ncnn 1.0.20261020 on x86 (AVX-512
    VNNI), 3x3 stride-1 int8 convolutions with winograd on are exact with 8-bit weights
    (tests/test_export_ncnn.py), so reduce_range defaults to off on x86 and on elsewhere."""
    if q.target == "ncnn" and q.reduce_range and is_ncnn_winograd(module):
        return min(q.bits_weight, 6)
    return q.bits_weight


def is_ncnn_winograd(m) -> bool:
    """ncnn2table.cpp: kernel 3x3, dilation 1, stride 1 Convolution (not depthwise) -> 31/absmax."""
    from torch import nn

    return (isinstance(m, nn.Conv2d) and m.groups == 1 and tuple(m.kernel_size) == (3, 3)
            and tuple(m.stride) == (1, 1) and tuple(m.dilation) == (1, 1))


def describe(q: QuantConfig) -> dict:
    """What the profile does, for reports."""
    if q.target == "generic":
        return {"target": "generic"}
    if q.target == "ort":
        return {"target": "ort", "reduce_range": q.reduce_range, "bits_weight": q.bits_weight,
                "note": ("7-bit weights: this CPU's u8s8 kernels saturate int16 pairs (no VNNI)"
                         if q.reduce_range else "8-bit weights: u8s8 kernels do not saturate here")}
    return {"target": "ncnn", "reduce_range": q.reduce_range,
            "note": "symmetric int8, scale 127/absmax, round half away, float adds/pools/bias"
                    + (", 6-bit weights for 3x3 stride-1 convolutions (ncnn2table, winograd)" if q.reduce_range else "")}


def ncnn_weight_scales(m) -> "torch.Tensor":
    """ncnn's float32 weight scale per output channel of a quantized layer: 127 / absmax, i.e.
    the reciprocal of dfq's (what the .bin holds and the int8 kernels multiply with)."""
    return (1.0 / m.weight_scale.float()).reshape(-1).expand(m.weight.shape[0]).contiguous()


def ncnn_depthwise_multipliers(in_scale: float, weight_scales) -> "np.ndarray":
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
    import tempfile

    import numpy as np
    import torch

    from dfq.export.ncnn import INT8_TAG
    from dfq.runtime import NcnnRunner

    ws = np.asarray(weight_scales, np.float32).reshape(-1)
    g = ws.size
    param = ("7767517\n2 2\n"
             f"Input in0 0 1 in0 0=1 1=1 2={g}\n"
             f"ConvolutionDepthWise dw 1 1 in0 out0 0={g} 1=1 11=1 2=1 12=1 3=1 13=1 4=0 14=0 5=0 6={g} 7={g} 8=1\n")
    blob = (struct.pack("<I", INT8_TAG) + np.ones(g, np.int8).tobytes() + b"\0" * (-g % 4)
            + ws.tobytes() + np.array([in_scale], np.float32).tobytes())
    with tempfile.TemporaryDirectory(prefix="dfq_ncnn_probe_") as tmp:
        Path(tmp, "p.param").write_text(param)
        Path(tmp, "p.bin").write_bytes(blob)
        run = NcnnRunner(Path(tmp, "p.param"), Path(tmp, "p.bin"), threads=1)
        x = torch.full((1, g, 1, 1), float(np.float32(1.0) / np.float32(in_scale)))  # quantizes to 1
        return run(x)[0].numpy().astype(np.float32)
