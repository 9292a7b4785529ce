"""The onnxruntime profile: QDQ -> QLinearConv / QLinearAdd / ... on the CPU.

uint8 asymmetric activations, int8 symmetric weights, int32 bias at s_in * s_w,
QuantizeLinear's round-half-to-even. On x86 CPUs without VNNI, MLAS's u8s8 GEMM multiplies
with vpmaddubsw, which adds two u8*s8 products into a saturating int16 (255*127*2 > 32767):
onnxruntime's own answer is "reduce_range", 7-bit weights, and so is ours (`reduce_range=None`
asks onnxruntime on this CPU).

A float convolution of dequantized values followed by a quantizer rounds almost exactly like
the runtime, but not at rounding ties: onnxruntime requantizes the exact int32 accumulator
with a float32 multiplier, `round_half_even(float(acc) * (s_x * s_w / s_y))` clamped to the
grid (QLinearConv::Compute and MlasRequantizeOutput). A deep network like MobileNetV2 amplifies
the rare tie flips into a 2 % argmax disagreement, so each conv whose input and output are
quantized computes exactly that (`QuantizedConv2d.requant`).
"""

from __future__ import annotations

import functools

from torch import fx, nn

from dfq.config import QuantConfig
from dfq.graph.modules import ChannelMin, GlobalAvgPool
from dfq.graph.ops import (
    activation_of,
    is_add,
    is_global_pool,
    swap_for_module,
    weighted_module,
)
from dfq.quant.activations import input_quantizer, input_quantizer_node
from dfq.quant.modules import ActQuant, AddGrids, IntegerAdd, QuantizedLayer, Requant
from dfq.runtimes.base import Runtime
from dfq.runtimes.cpu import cpu_flags, is_x86, qdq_grids
from dfq.runtimes.ort.runner import EXTRA


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
        return is_x86() and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())
    k, n, m = 64, 16, 8
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(np.full((k, n), 127, np.int8), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"a": np.full((m, k), 255, np.uint8)})[0]
    return int(y.min()) != 255 * 127 * k


def output_quantizer(gm: fx.GraphModule, node: fx.Node) -> ActQuant | None:
    """The quantizer right after `node`, or after the one activation that follows it."""
    users = list(node.users)
    if len(users) == 1 and activation_of(gm, users[0]) is not None:
        users = list(users[0].users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    aq = gm.get_submodule(users[0].target)
    return aq if isinstance(aq, ActQuant) and aq.quantizing else None


def _requant(in_q: ActQuant, out_q: ActQuant) -> Requant:
    """What an onnxruntime QLinear op needs to requantize: the input and output grids."""
    return Requant(
        in_q.scale.detach().clone(),
        out_q.scale.detach().clone(),
        int(out_q.zero_point),
        out_q.grid.qmin,
        out_q.grid.qmax,
    )


def exact_global_pools_(gm: fx.GraphModule) -> dict[str, str]:
    """Global average pools read from a quantizer (directly, or through the ChannelMin the
    exporter re-quantizes) and quantized after: QLinearGlobalAveragePool, computed exactly."""
    done = {}
    for node in list(gm.graph.nodes):
        if not is_global_pool(gm, node):
            continue
        src, q = node.args[0], input_quantizer_node(gm, node)
        if src is not q and not (
            src.op == "call_module"
            and isinstance(gm.get_submodule(src.target), ChannelMin)
            and src.args[0] is q
        ):
            continue
        in_q, out_q = input_quantizer(gm, node), output_quantizer(gm, node)
        if in_q is None or out_q is None:
            continue
        pool = GlobalAvgPool()
        pool.requant = _requant(in_q, out_q)
        name = swap_for_module(gm, node, f"exact_{node.name}", pool, src)
        done[name] = "integer-exact (as QLinearGlobalAveragePool)"
    if done:
        gm.recompile()
    return done


def integer_adds_(gm: fx.GraphModule, arithmetic: str) -> dict[str, str]:
    """Each add of two per-tensor quantized operands whose output is quantized (after at most one
    activation, which the runtime clamps into the add's output) computes on the integers as the
    runtime's quantized add (`IntegerAdd`)."""
    done = {}
    for node in list(gm.graph.nodes):
        if not (is_add(node) and len(node.args) == 2 and not node.kwargs):
            continue
        if not all(isinstance(a, fx.Node) for a in node.args):
            continue
        qa, qb = input_quantizer(gm, node), input_quantizer(gm, node, 1)
        out_q = output_quantizer(gm, node) if qa is not None and qb is not None else None
        if out_q is None or any(q.scale.numel() != 1 for q in (qa, qb, out_q)):
            continue
        add = IntegerAdd(arithmetic)
        add.requant = AddGrids(
            float(qa.scale),
            int(qa.zero_point),
            float(qb.scale),
            int(qb.zero_point),
            float(out_q.scale),
            int(out_q.zero_point),
            out_q.grid.qmin,
            out_q.grid.qmax,
        )
        name = swap_for_module(gm, node, f"exact_{node.name}", add, *node.args)
        done[name] = f"integer-exact (as {'XNNPACK' if arithmetic == 'xnnpack' else 'QLinearAdd'})"
    if done:
        gm.recompile()
    return done


class OrtProfile(Runtime):
    name = "ort"
    format = "onnx"
    runtime_modules = ("onnx", "onnxscript", "onnxruntime")
    extra = EXTRA
    add_arithmetic = "mlas"  # onnxruntime's QLinearAdd (MLAS); XNNPACK's profile: its qs8 add

    def resolve(self, q: QuantConfig) -> QuantConfig:
        reduce = ort_saturates() if q.reduce_range is None else q.reduce_range
        return qdq_grids(q, self.name, reduce)

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        """Every int8 conv with a quantized input and output (and an int32 bias) computes like
        QLinearConv, every global average pool between quantizers like
        QLinearGlobalAveragePool, every add between quantizers like QLinearAdd."""
        done = {}
        for node in gm.graph.nodes:
            m = weighted_module(gm, node)
            if not (isinstance(m, QuantizedLayer) and isinstance(m, nn.Conv2d)):
                continue
            if m.bias is not None and (m.bias_grid is None or m.bias_grid.bits != 32):
                continue
            in_q, out_q = input_quantizer(gm, node), output_quantizer(gm, node)
            if in_q is None or out_q is None:
                continue
            m.requant = _requant(in_q, out_q)
            done[node.target] = "integer-exact (as QLinearConv)"
        return {**done, **exact_global_pools_(gm), **integer_adds_(gm, self.add_arithmetic)}

    def describe(self, q: QuantConfig) -> dict:
        return {
            "target": "ort",
            "reduce_range": q.reduce_range,
            "bits_weight": q.bits_weight,
            "note": (
                "7-bit weights: this CPU's u8s8 kernels saturate int16 pairs (no VNNI)"
                if q.reduce_range
                else "8-bit weights: u8s8 kernels do not saturate here"
            ),
        }
