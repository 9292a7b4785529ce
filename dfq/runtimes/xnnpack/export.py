"""ExecuTorch .pte of a dfq fake-quant model: dfq's quantizers as quantized_decomposed
quantize/dequantize pairs on int8 (the zero point moved by 128 from dfq's uint8 grid: the same
numbers), weights as int8 tensors dequantized per channel, biases in float (XNNPACK quantizes
them at s_in * s_w, where dfq's int32 bias already is). That is the graph PT2E's convert_pt2e
writes, with dfq's qparams instead of observers'; XnnpackPartitioner lowers its DQ -> op -> Q
groups to XNNPACK's qs8 kernels."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.graph.modules import ChannelMin
from dfq.graph.ops import weighted_module
from dfq.quant.activations import input_quantizer_node
from dfq.quant.modules import ActQuant, QuantizedLayer
from dfq.runtimes.ort.export import QDQ, check_exportable, with_qdq_ops
from dfq.runtimes.ort.profile import output_quantizer
from dfq.runtimes.xnnpack.runner import EXTRA
from dfq.utils.deps import require


class _QDQ8(QDQ):
    """dfq's uint8 grid as int8: the same numbers, the integers and zero point less 128."""

    dtype, offset = torch.int8, -128


class _Int8Weights(nn.Module):
    """A quantized conv/linear with its int8 weights dequantized in the graph; `requantize`: its
    input's Q/DQ pair again, where a flatten or view sits between that pair and the layer."""

    def __init__(self, m: QuantizedLayer, requantize: nn.Module | None = None):
        super().__init__()
        self.layer, self.requantize = m, requantize
        self.register_buffer("wq", m.int_weight().to(torch.int8))
        scale = m.weight_scale.float().reshape(-1).expand(m.weight.shape[0]).contiguous()
        self.register_buffer("ws", scale)
        self.register_buffer("wz", torch.zeros(m.weight.shape[0], dtype=torch.int64))
        self.lo, self.hi = m.weight_grid.qmin, m.weight_grid.qmax

    def forward(self, x):
        m = self.layer
        if self.requantize is not None:
            x = self.requantize(x)
        w = torch.ops.quantized_decomposed.dequantize_per_channel(
            self.wq, self.ws, self.wz, 0, self.lo, self.hi, torch.int8
        )
        if isinstance(m, nn.Linear):
            return F.linear(x, w, m.bias)
        return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _with_int8_ops(gm: fx.GraphModule) -> tuple[nn.Module, set[str]]:
    """The exportable module, and the layers that stay float (no output quantizer).

    A layer whose output stays float is not lowered as qs8 (XNNPACK needs DQ -> op -> Q), and
    ExecuTorch's portable dequantize_per_channel gave wrong values: such a layer keeps its
    dequantized float weights and runs as XNNPACK's fp32 layer on the dequantized input."""
    check_exportable(gm, "ExecuTorch export", "xnnpack")
    float_out = {
        n.target
        for n in gm.graph.nodes
        if isinstance(weighted_module(gm, n), QuantizedLayer) and output_quantizer(gm, n) is None
    }
    model = with_qdq_ops(gm, _QDQ8)
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLayer) and name not in float_out:
            parent, _, attr = name.rpartition(".")
            again = _requantized_input(gm, name)
            setattr(
                model.get_submodule(parent) if parent else model,
                attr,
                _Int8Weights(m, _QDQ8(again) if again is not None else None),
            )
    return model, float_out


def _requantized_input(gm: fx.GraphModule, layer: str) -> ActQuant | None:
    """The quantizer of `layer`'s input where ops that keep its grid (a flatten before a linear
    layer) sit in between: XNNPACK lowers a layer as qs8 only when a DQ feeds it directly, and
    took DQ -> flatten -> linear for a float input on int8 weights (wrong values), so the export
    quantizes again there (the same integers)."""
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == layer)
    q, src = input_quantizer_node(gm, node), node.args[0]
    if q is None or src is q:
        return None
    if src.op == "call_module" and isinstance(gm.get_submodule(src.target), ChannelMin):
        return None  # with_qdq_ops already quantizes after a re-applied ReLU6 clip
    aq = gm.get_submodule(q.target)
    return aq if aq.quantizing else None


def _one_dequantize_per_user(gm: fx.GraphModule) -> None:
    """Give each user of a shared DequantizeLinear its own copy, as PT2E's convert does: the
    XNNPACK partitioner groups DQ -> op -> Q per op, and a DQ shared by a residual add and the
    next convolution would tie their partitions into a cycle."""
    dq = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != dq or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_before(user):
                copy_ = gm.graph.call_function(dq, node.args, node.kwargs)
            copy_.meta = dict(node.meta)
            user.replace_input_with(node, copy_)
    gm.graph.lint()
    gm.recompile()


def export_pte(gm: fx.GraphModule, path: Path, input_shape: tuple[int, ...]) -> dict:
    """Write `path` (.pte), XNNPACK-delegated, for one image at a time (ExecuTorch's runtime
    refused other batch sizes of a program exported with a dynamic batch)."""
    require("executorch", "ExecuTorch export", EXTRA)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.kernels import quantized  # noqa: F401  (out variants of what stays outside)

    model, float_out = _with_int8_ops(gm)
    program = torch.export.export(model, (torch.zeros((1, *input_shape[1:])),))
    _one_dequantize_per_user(program.graph_module)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    delegated = sum(
        n.op == "call_function" and "executorch_call_delegate" in str(n.target)
        for n in edge.exported_program().graph.nodes
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(edge.to_executorch().buffer)
    return {
        "pte": str(path),
        "int8_weights": sum(isinstance(m, _Int8Weights) for m in model.modules()),
        "float_layers": sorted(float_out),
        "delegates": delegated,
    }
