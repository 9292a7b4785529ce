"""SSDLite-MobileNetV2 of the TensorFlow Object Detection API, loaded from its frozen GraphDef.

Module names mirror the graph's scopes (`FeatureExtractor/MobilenetV2/expanded_conv_3/depthwise`
becomes `features.expanded_conv_3.depthwise`, `BoxPredictor_0/ClassPredictor` becomes
`heads.BoxPredictor_0.ClassPredictor`), each scope an nn.Sequential of [pad,] conv[, bn][, relu6],
so the loader maps tensors by name and nothing else. BatchNorms stay modules (eps 1e-3, as TF's
FusedBatchNorm): dfq folds them itself and keeps their statistics.

TF 'SAME' padding puts the odd extra row/column at the bottom/right. For the fixed 300x300
input the padding of every conv is computed statically when the model is built: a symmetric one
goes into the conv's `padding`, an asymmetric one (stride 2 on an even-sized map: 300, 150, 38,
10, 2) becomes an explicit nn.ZeroPad2d((0, 1, 0, 1)) before a conv with padding 0. Zero padding
is a pass-through op for dfq (scale-invariant), so equalization and moments look through it; a
dynamic pad computed from x.shape would trace into shape arithmetic that no pass understands.
Other input sizes need `image_size` at build time (the model's own preprocessing always
resizes to 300).

The forward returns raw `(class_logits (N, 1917, num_classes), box_encodings (N, 1917, 4))`, in the
order of dfq's other SSD (confidences first) and of TF's anchors (feature map, row, column,
anchor); encodings are TF's (ty, tx, th, tw). Anchors, decoding, sigmoid and NMS: dfq.tasks.tf_ssd.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfq.errors import DfqError
from dfq.models.blocks import MOBILENETV2_STAGES, flatten_head
from dfq.models.registry import InputConfig, register

IMAGE_SIZE = 300
BN_EPS = 1e-3
# Extra feature layers after Conv_1 (TF's multi_resolution_feature_maps with use_depthwise):
# 1x1 conv to depth/2, depthwise 3x3 stride 2, 1x1 conv to depth; all with BN and ReLU6.
_EXTRA_DEPTHS = (512, 256, 256, 128)
ANCHORS_PER_CELL = (3, 6, 6, 6, 6, 6)
SOURCE_BLOCK = "expanded_conv_13"
_TF_PREFIXES = {
    "FeatureExtractor/MobilenetV2/": "features.",
    "BoxPredictor_": "heads.BoxPredictor_",
}


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) along one axis: the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def tf_unit(
    inp: int,
    out: int,
    kernel: int,
    stride: int,
    size: int,
    groups: int = 1,
    bn: bool = True,
    relu6: bool = True,
) -> nn.Sequential:
    """One TF conv scope on a size x size input: [pad] conv [bn] [relu6], with TF 'SAME' padding."""
    before, after = same_padding(size, kernel, stride)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if before != after:
        layers["pad"] = nn.ZeroPad2d((before, after, before, after))
    layers["conv"] = nn.Conv2d(
        inp, out, kernel, stride, before if before == after else 0, groups=groups, bias=not bn
    )
    if bn:
        layers["bn"] = nn.BatchNorm2d(out, eps=BN_EPS)
    if relu6:
        layers["relu6"] = nn.ReLU6()
    return nn.Sequential(layers)


class ExpandedConv(nn.Module):
    """TF MobileNetV2's expanded_conv: [expand 1x1] -> depthwise 3x3 -> linear 1x1 (+ input)."""

    def __init__(self, inp: int, out: int, stride: int, expand: int, size: int):
        super().__init__()
        hidden = inp * expand
        if expand != 1:
            self.expand = tf_unit(inp, hidden, 1, 1, size)
        self.depthwise = tf_unit(hidden, hidden, 3, stride, size, groups=hidden)
        self.project = tf_unit(hidden, out, 1, 1, math.ceil(size / stride), relu6=False)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.expand(x) if hasattr(self, "expand") else x, x)

    def tail(self, expansion: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block after its expansion output (which SSD also reads as a feature map)."""
        y = self.project(self.depthwise(expansion))
        return x + y if self.residual else y


class TFSSDLite(nn.Module):
    """Feature maps (at 300x300): expanded_conv_13's expansion (19x19, 576), Conv_1 (10x10, 1280),
    then the extra layers (5x5 512, 3x3 256, 2x2 256, 1x1 128); on each, BoxPredictor_k's two
    heads: depthwise 3x3 + BN + ReLU6, then a 1x1 conv with bias, for 4 box encodings and
    num_classes logits (background first) per anchor; 3 anchors per cell on the first map, 6 on
    the others."""

    def __init__(self, num_classes: int = 2, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.num_classes = num_classes
        size = image_size
        f: OrderedDict[str, nn.Module] = OrderedDict(Conv=tf_unit(3, 32, 3, 2, size))
        size, inp = math.ceil(size / 2), 32
        for t, c, n, s in MOBILENETV2_STAGES:
            for i in range(n):
                stride = s if i == 0 else 1
                name = "expanded_conv" + (f"_{len(f) - 1}" if len(f) > 1 else "")
                if name == SOURCE_BLOCK:
                    widths, sizes = [inp * t], [size]
                f[name] = ExpandedConv(inp, c, stride, t, size)
                size, inp = math.ceil(size / stride), c
        f["Conv_1"] = tf_unit(inp, 1280, 1, 1, size)
        inp = 1280
        widths.append(inp)
        sizes.append(size)
        self.sources = ["Conv_1"]
        for i, depth in enumerate(_EXTRA_DEPTHS, start=2):
            name = f"layer_19_2_Conv2d_{i}_3x3_s2_{depth}"
            f[f"layer_19_1_Conv2d_{i}_1x1_{depth // 2}"] = tf_unit(inp, depth // 2, 1, 1, size)
            f[name + "_depthwise"] = tf_unit(depth // 2, depth // 2, 3, 2, size, groups=depth // 2)
            size, inp = math.ceil(size / 2), depth
            f[name] = tf_unit(depth // 2, depth, 1, 1, size)
            self.sources.append(name)
            widths.append(depth)
            sizes.append(size)
        self.features = nn.ModuleDict(f)
        self.feature_map_sizes = tuple(sizes)
        self.heads = nn.ModuleDict()
        for k, (c, s, a) in enumerate(zip(widths, sizes, ANCHORS_PER_CELL)):
            self.heads[f"BoxPredictor_{k}"] = nn.ModuleDict(
                {
                    "BoxEncodingPredictor_depthwise": tf_unit(c, c, 3, 1, s, groups=c),
                    "BoxEncodingPredictor": tf_unit(c, a * 4, 1, 1, s, bn=False, relu6=False),
                    "ClassPredictor_depthwise": tf_unit(c, c, 3, 1, s, groups=c),
                    "ClassPredictor": tf_unit(c, a * num_classes, 1, 1, s, bn=False, relu6=False),
                }
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = []
        for name, block in self.features.items():
            if name == SOURCE_BLOCK:  # the first (19x19) map is this block's expansion output
                expansion = block.expand(x)
                maps.append(expansion)
                x = block.tail(expansion, x)
            else:
                x = block(x)
            if name in self.sources:
                maps.append(x)
        logits, boxes = [], []
        for src, head in zip(maps, self.heads.values()):
            boxes.append(
                flatten_head(head.BoxEncodingPredictor(head.BoxEncodingPredictor_depthwise(src)), 4)
            )
            logits.append(
                flatten_head(
                    head.ClassPredictor(head.ClassPredictor_depthwise(src)), self.num_classes
                )
            )
        return torch.cat(logits, 1), torch.cat(boxes, 1)


# x * 2/255 - 1 is (p - 0.5) / 0.5 for p = x / 255; resized by dfq.tasks.tf_ssd, which evaluates it
@register(
    "tf_ssdlite_mobilenetv2",
    InputConfig(
        size=(3, IMAGE_SIZE, IMAGE_SIZE),
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        resize=0,
        crop=0,
        evaluation="tf_ssd",
    ),
)
def tf_ssdlite_mobilenetv2(num_classes: int = 2, image_size: int = IMAGE_SIZE) -> TFSSDLite:
    return TFSSDLite(num_classes, image_size)


def _torch_scope(tf_op_name: str, op: str) -> str:
    """`.../expanded_conv_3/depthwise/depthwise` -> `features.expanded_conv_3.depthwise` (conv, bias
    and BN ops sit one or two levels below their scope: X/Conv2D, X/BiasAdd,
    X/BatchNorm/FusedBatchNorm)."""
    scope = tf_op_name.rsplit("/", 2 if op == "FusedBatchNorm" else 1)[0]
    for prefix, replacement in _TF_PREFIXES.items():
        if scope.startswith(prefix):
            return (replacement + scope.removeprefix(prefix)).replace("/", ".")
    raise DfqError(
        f"unexpected TF scope '{scope}' in the frozen graph.",
        "pass an SSDLite-MobileNetV2 frozen graph",
    )


# TF op -> (torch names of its weight inputs 1.., their layout change to PyTorch's)
_WEIGHT_OPS = {
    "Conv2D": (("conv.weight",), (3, 2, 0, 1)),  # HWIO -> OIHW
    "DepthwiseConv2dNative": (("conv.weight",), (2, 3, 0, 1)),  # H W C 1 -> C 1 H W
    "BiasAdd": (("conv.bias",), None),
    "FusedBatchNorm": (("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"), None),
}
_WEIGHT_SUFFIXES = (
    "/weights",
    "/depthwise_weights",
    "/biases",
    "/gamma",
    "/beta",
    "/moving_mean",
    "/moving_variance",
)


def state_dict_from_graphdef(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of `TFSSDLite` from a TF OD API frozen graph, strictly: every weight constant
    feeds exactly one tensor, every conv is SAME-padded and undilated, every BN is in inference mode
    with epsilon 1e-3. Missing or extra keys against the model are checked by
    dfq.models.checkpoints."""
    from dfq.models.tf_graphdef import read_graphdef

    nodes = read_graphdef(path)
    by_name = {n.name: n for n in nodes}
    used: set[str] = set()

    def const(ref: str) -> np.ndarray:
        node = by_name[ref.split(":")[0]]
        while node.op == "Identity":
            node = by_name[node.inputs[0].split(":")[0]]
        if node.op != "Const" or node.name in used:
            raise DfqError(
                f"{ref} is not a constant used once: the graph is not a frozen inference graph."
            )
        used.add(node.name)
        return node.tensor

    sd: dict[str, torch.Tensor] = {}
    for n in nodes:
        if n.op not in _WEIGHT_OPS:
            continue
        if n.op == "FusedBatchNorm" and (
            n.attrs.get("is_training") or abs(n.attrs["epsilon"] - BN_EPS) > 1e-7
        ):
            raise DfqError(
                f"{n.name}: a training-mode BN or epsilon {n.attrs['epsilon']} (expected 1e-3)."
            )
        if n.op in ("Conv2D", "DepthwiseConv2dNative") and (
            n.attrs["padding"] != b"SAME" or any(d != 1 for d in n.attrs.get("dilations", [1]))
        ):
            raise DfqError(
                f"{n.name}: padding {n.attrs['padding']!r} or dilation (TFSSDLite assumes SAME, 1)."
            )
        scope = _torch_scope(n.name, n.op)
        names, perm = _WEIGHT_OPS[n.op]
        for key, ref in zip(names, n.inputs[1:], strict=True):
            value = const(ref)
            sd[f"{scope}.{key}"] = torch.from_numpy(
                value.transpose(perm) if perm else value
            ).contiguous()
    unused = [
        n.name
        for n in nodes
        if n.op == "Const" and n.name.endswith(_WEIGHT_SUFFIXES) and n.name not in used
    ]
    if unused:
        raise DfqError(
            f"{len(unused)} weight constant(s) of the graph feed no conv or BN, e.g. {unused[:3]}.",
            "pass an SSDLite-MobileNetV2 frozen graph of the TF Object Detection API",
        )
    return sd
