"""ncnn int8 export, written by dfq itself (no ncnn2table/ncnn2int8 run needed).

1. pnnx (PyPI) converts a float copy of the fake-quant model -- dequantized weights, float
   biases, no quantizers -- into `<stem>.fp32.param/.bin` (fp16=False).
2. Every Convolution / ConvolutionDepthWise / InnerProduct whose input dfq quantized becomes
   int8 in `<stem>.param/.bin`, laid out as ncnn's own tools/quantize/ncnn2int8.cpp writes it
   (NetQuantize::save + fwrite_weight_tag_data) and src/layer/convolution*.cpp, innerproduct.cpp
   read it (load_model):
     param: `8=2` (int8_scale_term) for Convolution and InnerProduct: one weight scale per output
            channel; `8=1` for ConvolutionDepthWise: one weight scale per group.
     bin:   int32 tag 0x000D4B38 (ModelBin: "int8 data"), the int8 weights, zero padding to a
            multiple of 4 bytes; the fp32 bias (bias_term); the fp32 weight scales (num_output,
            or group for depthwise); one fp32 input-blob scale (bottom_blob_int8_scales, 1).
   ncnn's scales are reciprocal to dfq's: ncnn quantizes with q = float2int8(x * scale) =
   clamp(round(x * scale), -127, 127) (round half away from zero), scale = 127 / absmax
   (ncnn2table.cpp), and dequantizes the int32 sum with 1 / (bottom_scale * weight_scale[c])
   before adding the fp32 bias (convolution.cpp forward_int8). dfq's ncnn profile
   (dfq/runtimes/ncnn/profile.py) simulates exactly this.
3. `<stem>.table`: the same scales in ncnn2table's calibration-table format -- a
   `<layer>_param_0 s_0 s_1 ...` line per layer, then a `<layer> s_in` line per layer -- for
   users who run ncnn2int8 on the fp32 files themselves (ncnn2int8 re-quantizes the on-grid
   fp32 weights to the same integers).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from dfq.errors import DfqError
from dfq.graph.modules import GlobalAvgPool
from dfq.graph.ops import weighted_module
from dfq.quant.modules import ActQuant, QuantizedLayer, layer_like
from dfq.runtimes.ncnn.profile import INT8_TAG, ncnn_weight_scales
from dfq.runtimes.ncnn.runner import EXTRA
from dfq.utils.deps import require

WEIGHTED = {"Convolution", "ConvolutionDepthWise", "InnerProduct"}
# layer types the int8 rewrite walks through; anything else with data in the .bin is refused
WEIGHTLESS = {
    "Input",
    "Split",
    "BinaryOp",
    "Pooling",
    "Flatten",
    "Reshape",
    "Clip",
    "ReLU",
    "Crop",
    "Padding",
    "Concat",
    "Eltwise",
    "Slice",
    "Interp",
    "Dropout",
    "Noop",
    "Softmax",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Swish",
    "Permute",
    "Squeeze",
    "ExpandDims",
    "UnaryOp",
    "ReLU6",
    "Pooling1D",
    "Pooling3D",
    "ShuffleChannel",
    "PixelShuffle",
    "Reorg",
    "Mish",
    "TanH",
    "Cast",
}


@dataclass
class NcnnLayer:
    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: list[str]  # "k=v" tokens as written

    def param(self, key: int, default: int = 0) -> int:
        for tok in self.params:
            k, _, v = tok.partition("=")
            if k == str(key):
                return int(v.split(",")[0])
        return default

    def line(self) -> str:
        return " ".join(
            [
                f"{self.type:<24s}",
                f"{self.name:<24s}",
                str(len(self.bottoms)),
                str(len(self.tops)),
                *self.bottoms,
                *self.tops,
                *self.params,
            ]
        )


@dataclass
class NcnnExport:
    param: Path
    bin: Path
    fp32_param: Path
    fp32_bin: Path
    table: Path
    input_name: str
    output_names: list[str]  # the model's outputs in order (pnnx's out0, out1, ...)
    int8_layers: dict[str, str] = field(default_factory=dict)  # ncnn layer -> dfq module
    float_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def read_param(path: Path) -> tuple[str, list[NcnnLayer]]:
    lines = Path(path).read_text().split("\n")
    magic, counts = lines[0].strip(), lines[1].strip()
    layers = []
    for line in lines[2:]:
        tok = line.split()
        if not tok:
            continue
        nb, nt = int(tok[2]), int(tok[3])
        layers.append(
            NcnnLayer(
                tok[0], tok[1], tok[4 : 4 + nb], tok[4 + nb : 4 + nb + nt], tok[4 + nb + nt :]
            )
        )
    return f"{magic}\n{counts}\n", layers


def _read_weights(layers: list[NcnnLayer], data: bytes):
    """fp32 weights and biases of the weighted layers of a pnnx .bin (tag 0 = raw float32), and
    the MemoryData constants (raw float32, no tag: ncnn's MemoryData::load_model), by layer."""
    out, constants, pos = {}, {}, 0
    for layer in layers:
        if layer.type in WEIGHTED:
            n_w = layer.param(6) if layer.type != "InnerProduct" else layer.param(2)
            has_bias = layer.param(5) if layer.type != "InnerProduct" else layer.param(1)
            if layer.param(8):
                raise DfqError(f"{layer.name} is already int8.")
            (tag,) = struct.unpack_from("<I", data, pos)
            if tag != 0:
                raise DfqError(
                    f"{layer.name}: weight tag {tag:#x} is not fp32 (pnnx fp16=False expected)."
                )
            pos += 4
            w = np.frombuffer(data, np.float32, n_w, pos)
            pos += 4 * n_w
            b = None
            if has_bias:
                b = np.frombuffer(data, np.float32, layer.param(0), pos)
                pos += 4 * layer.param(0)
            out[layer.name] = (w, b)
        elif layer.type == "MemoryData":  # constants, e.g. ChannelMin bounds: raw float32, no tag
            dims = [layer.param(k) for k in (0, 1, 11, 2)]
            n = int(np.prod([d for d in dims if d])) if any(dims) else 0
            constants[layer.name] = np.frombuffer(data, np.float32, n, pos)
            pos += 4 * n
        elif layer.type not in WEIGHTLESS:
            raise DfqError(
                f"ncnn layer type {layer.type} ({layer.name}) is not supported by the int8 writer.",
                "the model has an op dfq cannot place in the ncnn .bin",
            )
    if pos != len(data):
        raise DfqError(f"ncnn .bin has {len(data) - pos} unread bytes: unexpected layer data.")
    return out, constants


def _container_clip(aq: ActQuant) -> nn.Hardtanh | None:
    """Below 8 bits, the int8 layer's own clamp(round(x * scale), -127, 127) is too wide: a float
    Clip to the grid's levels before it (ncnn Clip) makes it land on them."""
    if not aq.quantizing or aq.grid.bits == 8:
        return None
    s = float(aq.scale)
    return nn.Hardtanh(aq.grid.qmin * s, aq.grid.qmax * s)


def float_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """Plain nn.Conv2d/nn.Linear with the dequantized weights, quantizers removed (for pnnx)."""
    model = copy.deepcopy(gm).eval()
    for name, m in list(model.named_modules()):
        new = None
        if isinstance(m, ActQuant):
            new = _container_clip(m) or nn.Identity()
        elif isinstance(m, GlobalAvgPool):  # ncnn's Pooling, whose arithmetic it simulates
            new = nn.AdaptiveAvgPool2d(1)
        elif isinstance(m, QuantizedLayer):
            new = layer_like(m)  # plain nn.Conv2d / nn.Linear
            new.load_state_dict(
                {k: v for k, v in m.state_dict().items() if k in ("weight", "bias")}
            )
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    _strided_slices_as_pools(model)
    model.recompile()
    return model.float().eval()


def _strided_slices_as_pools(gm: fx.GraphModule) -> None:
    """x[:, :, ::s, ::s] -> max_pool2d(x, 1, s): the same values, and an op ncnn has (pnnx cannot
    convert strided slices; ResNet "option A" shortcuts use them)."""
    import operator

    full = slice(None, None, None)
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_function"
            or node.target is not operator.getitem
            or not isinstance(node.args[1], tuple)
        ):
            continue
        idx = node.args[1]
        if (
            len(idx) != 4
            or idx[0] != full
            or idx[1] != full
            or not all(isinstance(i, slice) for i in idx[2:])
        ):
            continue
        (h, w) = idx[2:]
        if (
            h.start not in (None, 0)
            or w.start not in (None, 0)
            or h.stop is not None
            or w.stop is not None
        ):
            continue
        stride = (h.step or 1, w.step or 1)
        with gm.graph.inserting_after(node):
            pool = gm.graph.call_function(torch.nn.functional.max_pool2d, (node.args[0], 1, stride))
        node.replace_all_uses_with(pool)
        gm.graph.erase_node(node)
    gm.graph.lint()


@contextlib.contextmanager
def _quiet(log_path: Path):
    """pnnx prints its passes on the process's stdout/stderr: send them to a log file."""
    with open(log_path, "w") as f:
        saved = os.dup(1), os.dup(2)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def pnnx_convert(model: nn.Module, stem: Path, input_shape: tuple[int, ...]) -> tuple[Path, Path]:
    """Float model -> `<stem>.fp32.param/.bin` with pnnx."""
    pnnx = require("pnnx", "ncnn export", EXTRA)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dfq_pnnx_") as tmp:
        pt = Path(tmp) / "model.pt"
        x = torch.rand(*input_shape)
        with _quiet(stem.parent / f"{stem.name}.pnnx.log"), torch.no_grad():
            pnnx.export(model, str(pt), (x,), fp16=False)
        param, binf = Path(tmp) / "model.ncnn.param", Path(tmp) / "model.ncnn.bin"
        if not param.exists():
            raise DfqError(
                f"pnnx wrote no ncnn model (see {stem.parent / (stem.name + '.pnnx.log')})."
            )
        out_param, out_bin = stem.with_suffix(".fp32.param"), stem.with_suffix(".fp32.bin")
        out_param.write_bytes(param.read_bytes())
        out_bin.write_bytes(binf.read_bytes())
    return out_param, out_bin


def _match(gm: fx.GraphModule, weights: dict) -> dict[str, str]:
    """ncnn layer name -> dfq module name, by identical weights (pnnx may rename and reorder)."""
    candidates = {
        n.target: gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if weighted_module(gm, n) is not None
    }
    flat = {name: m.weight.detach().float().reshape(-1).numpy() for name, m in candidates.items()}
    mapping, used = {}, set()
    for layer, (w, _) in weights.items():
        hits = [
            name
            for name, v in flat.items()
            if name not in used and v.size == w.size and np.allclose(v, w, rtol=1e-6, atol=1e-12)
        ]
        if len(hits) != 1:
            raise DfqError(
                f"ncnn layer {layer} matches {len(hits)} dfq layers by its weights.",
                "cannot place its int8 weights",
            )
        mapping[layer] = hits[0]
        used.add(hits[0])
    return mapping


def _input_quantizer(gm: fx.GraphModule, module_name: str) -> ActQuant | None:
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == module_name:
            src = n.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module":
                aq = gm.get_submodule(src.target)
                if isinstance(aq, ActQuant) and aq.quantizing:
                    return aq
    return None


def _output_blobs(gm: fx.GraphModule, layers: list[NcnnLayer]) -> list[str]:
    """The ncnn blobs of the model's outputs, in the order of its return value: the blobs no
    layer reads, which pnnx names out0, out1, ... in that order (an SSD's scores and boxes)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    read = {b for layer in layers for b in layer.bottoms}
    ends = [t for layer in layers for t in layer.tops if t not in read]
    named = sorted((t for t in ends if re.fullmatch(r"out\d+", t)), key=lambda t: int(t[3:]))
    if len(named) != n_out:
        raise DfqError(
            f"the model returns {n_out} output(s) but pnnx's ncnn graph ends in {ends}.",
            "export with `format`=onnx, or report the model to dfq",
        )
    return named


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def export_ncnn(gm: fx.GraphModule, stem: str | Path, input_shape: tuple[int, ...]) -> NcnnExport:
    """Write `<stem>.param/.bin` (int8), `<stem>.fp32.param/.bin` and `<stem>.table`."""
    for name, m in gm.named_modules():
        if (
            isinstance(m, ActQuant)
            and m.quantizing
            and not (m.reciprocal and m.grid.symmetric and m.grid.bits <= 8)
        ):
            raise DfqError(
                "the model was not quantized with the ncnn profile.", "quantize with `target`=ncnn"
            )
    stem = Path(stem)
    fp32_param, fp32_bin = pnnx_convert(float_copy(gm), stem, tuple(input_shape))
    header, layers = read_param(fp32_param)
    weights, constants = _read_weights(layers, fp32_bin.read_bytes())
    mapping = _match(gm, weights)
    info = NcnnExport(
        stem.with_suffix(".param"),
        stem.with_suffix(".bin"),
        fp32_param,
        fp32_bin,
        stem.with_suffix(".table"),
        layers[0].tops[0] if layers and layers[0].type == "Input" else "in0",
        _output_blobs(gm, layers),
    )
    blob, weight_lines, input_lines = bytearray(), [], []
    for layer in layers:
        if layer.type == "MemoryData":
            blob += constants[layer.name].tobytes()
            continue
        if layer.type not in WEIGHTED:
            continue
        w32, b32 = weights[layer.name]
        mod_name = mapping[layer.name]
        m = gm.get_submodule(mod_name)
        aq = _input_quantizer(gm, mod_name)
        if aq is None or not isinstance(m, QuantizedLayer):
            info.float_layers.append(layer.name)
            blob += (
                struct.pack("<I", 0) + w32.tobytes() + (b32.tobytes() if b32 is not None else b"")
            )
            continue
        grid = m.weight_grid
        if not grid.symmetric or grid.bits > 8:
            raise DfqError(f"{mod_name}: {grid} weights cannot be ncnn int8.")
        q = m.int_weight().numpy().astype(np.int8).reshape(-1)
        n_out = m.weight.shape[0]
        w_scales = ncnn_weight_scales(m).numpy()  # ncnn: 127 / absmax per channel
        in_scale = np.float32(aq.inv_scale())  # ncnn: 127 / absmax of the input
        term = 1 if layer.type == "ConvolutionDepthWise" else 2
        if term == 1 and layer.param(7, 1) != n_out:
            raise DfqError(
                f"{layer.name}: grouped (not depthwise) int8 convolution is not supported."
            )
        layer.params = [p for p in layer.params if not p.startswith("8=")] + [f"8={term}"]
        bias = m.bias.detach().float().numpy() if m.bias is not None else None
        blob += _pad4(struct.pack("<I", INT8_TAG) + q.tobytes())
        if bias is not None:
            blob += bias.astype(np.float32).tobytes()
        blob += w_scales.tobytes() + np.array([in_scale], np.float32).tobytes()
        info.int8_layers[layer.name] = mod_name
        weight_lines.append(f"{layer.name}_param_0 " + " ".join(f"{v:.9g}" for v in w_scales))
        input_lines.append(f"{layer.name} {in_scale:.9g}")
    info.param.write_text(header + "\n".join(layer.line() for layer in layers) + "\n")
    info.bin.write_bytes(bytes(blob))
    info.table.write_text("\n".join(weight_lines + input_lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(info.to_dict(), indent=1))
    return info
