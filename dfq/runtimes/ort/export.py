"""ONNX QDQ export of dfq's fake-quant model, for onnxruntime's integer kernels.

torch's ONNX exporter (dynamo, onnxscript) writes each `ActQuant` (a
fake_quantize_per_tensor_affine on a uint8 grid) as a QuantizeLinear/DequantizeLinear pair with
dfq's scale and zero point, and names initializers by module path. We then put the integers in:

- weights: int8 initializer + DequantizeLinear (per tensor, or per output channel on axis 0);
- biases: int32 initializer at scale s_in * s_w[c], zero point 0, + DequantizeLinear;
- ReduceMean over H, W (a global average pool) -> GlobalAveragePool, which has an int8 kernel
  (QLinearGlobalAveragePool); ReduceMean has none;
- a Relu/Clip between a Conv and its QuantizeLinear is dropped where the quantizer's saturation
  already computes it exactly (zero point at qmin, top of the grid at or below the clip), so
  that onnxruntime can fuse DQ -> Conv -> Q into QLinearConv. The simulation is unchanged by
  this: clamp-then-quantize and quantize-with-saturation give the same integers.

onnxruntime (graph optimization level >= basic) then replaces DQ -> op -> Q groups by
QLinearConv, QLinearAdd, QLinearGlobalAveragePool, ... (see runner.py here: integer_ops()).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx

from dfq.errors import DfqError
from dfq.graph.modules import ChannelMin, GlobalAvgPool
from dfq.quant.modules import ActQuant, IntegerAdd, QuantizedLayer
from dfq.runtimes.ort.runner import EXTRA
from dfq.utils.deps import require

log = logging.getLogger("dfq")

OPSET = 18


@dataclass
class OnnxExport:
    path: Path
    weights: list[str] = field(default_factory=list)  # modules whose weights are int8 in the file
    pools: int = 0  # ReduceMean -> GlobalAveragePool rewrites
    dropped_activations: list[str] = field(default_factory=list)


def check_exportable(
    gm: fx.GraphModule, what: str = "ONNX QDQ export", target: str = "ort"
) -> None:
    """The QDQ grids `what` writes: 8-bit asymmetric activations, symmetric int8 weights, int32
    bias at s_in * s_w (`target`: the profile that gives them)."""
    for name, m in gm.named_modules():
        if isinstance(m, ActQuant):
            if (
                not m.quantizing
            ):  # no range: the simulation keeps this tensor in float, so does the export
                continue
            if m.grid.bits > 8 or m.grid.symmetric or m.reciprocal:
                raise DfqError(
                    f"{name} is on a {m.grid} grid: {what} writes 8-bit asymmetric activations.",
                    f"use `target`={target} (or the default asymmetric 8-bit activations)",
                )
        if isinstance(m, QuantizedLayer):
            if m.weight_grid.bits > 8 or not m.weight_grid.symmetric:
                raise DfqError(
                    f"{name} has {m.weight_grid} weights: {what} writes symmetric int8.",
                    "use `bits_weight` <= 8 and drop asymmetric weights (`weight_symmetric`)",
                )
            if m.bias is not None and (m.bias_grid is None or m.bias_grid.bits != 32):
                raise DfqError(f"{name}'s bias is not int32 at s_in * s_w.", "use `bits_bias`=32")


def export_onnx(gm: fx.GraphModule, path: str | Path, input_shape: tuple[int, ...]) -> OnnxExport:
    """Write `gm` (a dfq fake-quant GraphModule) as an ONNX QDQ model with a dynamic batch."""
    onnx = require("onnx", "ONNX export", EXTRA)
    require("onnxscript", "ONNX export (torch's dynamo exporter)", EXTRA)

    check_exportable(gm)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = with_qdq_ops(gm)
    x = torch.zeros(input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.onnx.export(
        model,
        (x,),
        dynamo=True,
        opset_version=OPSET,
        verbose=False,
        dynamic_shapes=({0: batch},),
        input_names=["input"],
        output_names=["logits"],
    )
    proto = program.model_proto
    info = OnnxExport(path)
    _integer_parameters(proto, gm, info)
    info.pools = _global_pools(proto)
    _drop_redundant_clips(proto, info)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return info


class QDQ(torch.nn.Module):
    """An ActQuant for export: quantize_per_tensor/dequantize_per_tensor with constant qparams
    (exported as QuantizeLinear/DequantizeLinear; same integers as ActQuant's fake quant), on
    uint8 as dfq's grid; a subclass may shift the integers to another dtype (`offset`)."""

    dtype, offset = torch.uint8, 0

    def __init__(self, aq: ActQuant):
        super().__init__()
        self.scale, self.zero_point = float(aq.scale), int(aq.zero_point) + self.offset
        self.qmin, self.qmax = aq.grid.qmin + self.offset, aq.grid.qmax + self.offset
        info = torch.iinfo(self.dtype)
        self.full = (self.qmin, self.qmax) == (info.min, info.max)

    def forward(self, x):
        args = (self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        q = torch.ops.quantized_decomposed.quantize_per_tensor(x, *args)
        if not self.full:  # fewer bits: a Clip to the grid's levels (ONNX ignores quant_min/max)
            q = torch.clamp(q, self.qmin, self.qmax)
        return torch.ops.quantized_decomposed.dequantize_per_tensor(q, *args)


def _requantize_clips(model: fx.GraphModule, qdq: type[QDQ]) -> None:
    """A ChannelMin (ReLU6 kept through equalization) after a quantizer becomes Min followed by
    the same Q/DQ: its bounds are on that grid, so the integers are unchanged, and the next
    conv again reads a quantized tensor (DQ -> Conv -> Q fuses into QLinearConv)."""
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), ChannelMin):
            continue
        src = node.args[0]
        aq = model.get_submodule(src.target) if src.op == "call_module" else None
        if isinstance(aq, ActQuant) and aq.quantizing:
            parent, _, attr = node.target.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, attr, torch.nn.Sequential(model.get_submodule(node.target), qdq(aq)))


def with_qdq_ops(gm: fx.GraphModule, qdq: type[QDQ] = QDQ) -> fx.GraphModule:
    """A copy of `gm` for torch.export: each quantizer a `qdq` pair, the plain float ops where
    the simulation computes a runtime's integer arithmetic (the runtime does that itself)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    model = copy.deepcopy(gm).eval()
    for m in model.modules():
        if isinstance(m, (QuantizedLayer, GlobalAvgPool, IntegerAdd)):
            m.requant = None  # the runtime does the integer arithmetic; export the plain op
        if isinstance(m, QuantizedLayer):
            m.dequant = None
    _requantize_clips(model, qdq)
    for name, m in list(model.named_modules()):
        if isinstance(m, ActQuant):
            parent, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                attr,
                qdq(m) if m.quantizing else torch.nn.Identity(),
            )
    return model


def _initializers(proto) -> dict:
    return {t.name: t for t in proto.graph.initializer}


def _module_of(gm: fx.GraphModule, tensor_name: str, suffix: str):
    if not tensor_name.endswith(suffix):
        return None
    try:
        m = gm.get_submodule(tensor_name[: -len(suffix)])
    except AttributeError:
        return None
    return m if isinstance(m, QuantizedLayer) else None


def _integer_parameters(proto, gm: fx.GraphModule, info: OnnxExport) -> None:
    """Float weight/bias initializers -> int8/int32 initializers + DequantizeLinear."""
    inits = _initializers(proto)
    new_nodes, done = [], set()
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        wname = node.input[1]
        m = _module_of(gm, wname, ".weight")
        if m is None or wname not in inits:
            raise DfqError(
                f"exported {node.op_type} {node.name} has weight '{wname}', "
                "not a dfq quantized layer.",
                "report this model: its export needs a name mapping",
            )
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if not trans_b:
                raise DfqError(f"Gemm {node.name} without transB: unexpected export layout.")
        if wname not in done:
            done.add(wname)
            q = m.int_weight().numpy().astype(np.int8)
            per_channel = m.weight_axis is not None
            scale = m.weight_scale.float().numpy().reshape(-1 if per_channel else ())
            _replace_with_dq(
                proto,
                inits[wname],
                q,
                scale,
                np.zeros(scale.shape, np.int8),
                0 if per_channel else None,
                new_nodes,
            )
            info.weights.append(wname[: -len(".weight")])
        if len(node.input) > 2 and node.input[2] and node.input[2] not in done:
            bname = node.input[2]
            done.add(bname)
            qb = m.int_bias().numpy().astype(np.int32)
            bscale = m.bias_scale.float().numpy()
            _replace_with_dq(
                proto,
                inits[bname],
                qb,
                bscale,
                np.zeros(bscale.shape, np.int32),
                0 if bscale.ndim else None,
                new_nodes,
            )
    for i, n in enumerate(new_nodes):
        proto.graph.node.insert(i, n)


def _replace_with_dq(
    proto, init, q: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis, new_nodes
) -> None:
    from onnx import helper, numpy_helper

    name = init.name
    proto.graph.initializer.remove(init)
    qname, sname, zname = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(q, qname),
            numpy_helper.from_array(scale.astype(np.float32), sname),
            numpy_helper.from_array(zp, zname),
        ]
    )
    kwargs = {"axis": axis} if axis is not None else {}
    new_nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [qname, sname, zname],
            [name],
            name=f"{name}_DequantizeLinear",
            **kwargs,
        )
    )


def _const_ints(proto, name: str) -> list[int] | None:
    from onnx import numpy_helper

    for t in proto.graph.initializer:
        if t.name == name:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return [int(v) for v in numpy_helper.to_array(n.attribute[0].t).reshape(-1)]
    return None


def _global_pools(proto) -> int:
    """ReduceMean over the two spatial axes with keepdims -> GlobalAveragePool (int8 kernel)."""
    from onnx import helper

    count = 0
    for i, node in enumerate(list(proto.graph.node)):
        if node.op_type != "ReduceMean" or len(node.input) < 2:
            continue
        axes = _const_ints(proto, node.input[1])
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        if axes is None or sorted(a % 4 for a in axes) != [2, 3] or not keep:
            continue
        gap = helper.make_node(
            "GlobalAveragePool", [node.input[0]], list(node.output), name=node.name or f"gap_{i}"
        )
        idx = list(proto.graph.node).index(node)
        proto.graph.node.remove(node)
        proto.graph.node.insert(idx, gap)
        count += 1
    return count


def _drop_redundant_clips(proto, info: OnnxExport) -> None:
    """Conv -> Relu/Clip -> QuantizeLinear where the quantizer's saturation equals the clip."""
    from onnx import numpy_helper

    inits = _initializers(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        p = producers.get(name)
        if p is not None and p.op_type == "Constant":
            return numpy_helper.to_array(p.attribute[0].t)
        return None

    def _top(q) -> int:
        """The top of q's grid: 255, or the bound of the uint8 Clip below 8 bits."""
        after = consumers.get(q.output[0], [])
        if len(after) == 1 and after[0].op_type == "Clip" and len(after[0].input) > 2:
            bound = value(after[0].input[2])
            if bound is not None and bound.dtype == np.uint8:
                return int(bound)
        return 255

    for node in list(proto.graph.node):
        if node.op_type not in ("Relu", "Clip"):
            continue
        src = producers.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if (
            src is None
            or src.op_type not in ("Conv", "Gemm")
            or len(consumers.get(src.output[0], [])) != 1
        ):
            continue
        if (
            len(users) != 1
            or users[0].op_type != "QuantizeLinear"
            or node.output[0] in _graph_outputs(proto)
        ):
            continue
        q = users[0]
        scale, zp = value(q.input[1]), value(q.input[2])
        if scale is None or zp is None or zp.dtype != np.uint8:
            continue
        lo, hi = 0.0, float("inf")
        if node.op_type == "Clip":
            lo_v = value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi_v = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            lo = float(lo_v) if lo_v is not None else float("-inf")
            hi = float(hi_v) if hi_v is not None else float("inf")
        s, z = float(scale), int(zp)
        # exact iff values below lo all land on q(lo) = qmin and the top of the grid is <= q(hi)
        if lo != 0.0 or z != 0:
            continue
        if hi != float("inf") and np.round(np.float32(hi) / np.float32(s)) + z < _top(q):
            continue
        q.input[0] = node.input[0]
        proto.graph.node.remove(node)
        info.dropped_activations.append(node.name)


def _graph_outputs(proto) -> set[str]:
    return {o.name for o in proto.graph.output}
