"""Declarative op tables: what each fx node *is*, for every pass that walks the graph.

Passes ask `classify(gm, node)` instead of growing their own if-chains, so supporting a
new op means one line here.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass
from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import fx, nn

from dfq.graph.modules import ChannelMin, GlobalAvgPool

WEIGHTED = (nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm2d, nn.BatchNorm1d)

# Ops through which a positive per-channel scale passes unchanged and which keep the channel
# layout (so equalization can look through them) and the per-channel mean (bias correction).
# Resampling (F.interpolate, nn.Upsample) is linear per channel with weights summing to 1.
# Identities in eval mode (below) are pass-through too.
PASS_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    GlobalAvgPool,
    nn.ZeroPad2d,
    nn.Flatten,
    nn.Upsample,
)
PASS_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten, F.interpolate}
PASS_METHODS = {"flatten", "contiguous"}
# Of those, the ones whose output lies on its input's quantization grid (no requantization).
GRID_PRESERVING = (
    nn.MaxPool2d,
    nn.ZeroPad2d,
    nn.Flatten,
    F.max_pool2d,
    torch.flatten,
    "flatten",
    "contiguous",
)

# The identity in eval mode (dfq only transforms eval-mode graphs): dropout of every kind, and
# stochastic depth / drop path (torchvision's StochasticDepth and stochastic_depth, timm's
# DropPath and drop_path), those matched by name so that dfq imports neither library. A
# functional call counts only where its `training` argument is False.
EVAL_IDENTITY_MODULES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
EVAL_IDENTITY_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
EVAL_IDENTITY_NAMES = {"StochasticDepth", "DropPath", "stochastic_depth", "drop_path"}

ADD_FUNCTIONS = {operator.add, torch.add}
MUL_FUNCTIONS = {operator.mul, torch.mul}
CAT_FUNCTIONS = {torch.cat, torch.concat}


@dataclass(frozen=True, eq=False)
class Activation:
    """A clipping activation: y = clamp(x, lo, hi) (ReLU: [0, inf), ReLU6: [0, 6]);
    `hi` is a per-channel tensor for dfq's ChannelMin."""

    kind: str
    lo: float
    hi: float | torch.Tensor

    @property
    def scale_invariant(self) -> bool:
        """Only an unbounded ReLU commutes with a positive per-channel scale."""
        return self.lo == 0.0 and isinstance(self.hi, float) and math.isinf(self.hi)

    @property
    def rescalable(self) -> bool:
        """An upper clip that equalization can carry exactly as per-channel bounds (hi / s):
        ReLU6, hardtanh(0, b), ChannelMin."""
        return self.kind == "channel_min" or (
            self.lo == 0.0 and isinstance(self.hi, float) and math.isfinite(self.hi) and self.hi > 0
        )


RELU = Activation("relu", 0.0, math.inf)
RELU6 = Activation("relu6", 0.0, 6.0)


def activation_of(gm: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The clipping activation a node computes, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is nn.ReLU:
            return RELU
        if isinstance(m, ChannelMin):
            return Activation("channel_min", -math.inf, m.hi)
        if type(m) is nn.ReLU6:
            return RELU6
        if type(m) is nn.Hardtanh:
            return Activation("hardtanh", m.min_val, m.max_val)
    elif node.op == "call_function":
        if node.target in (F.relu, torch.relu):
            return RELU
        if node.target is F.relu6:
            return RELU6
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            return Activation("hardtanh", float(lo), float(hi))
    elif node.op == "call_method" and node.target == "relu":
        return RELU
    return None


@dataclass(frozen=True)
class Pointwise:
    """An elementwise activation that is neither a clip nor scale-invariant (SiLU, GELU, ...):
    it gets data-free moments (dfq.statistics.activation_moments), and equalization stops at it."""

    kind: str
    param: float | str | None = None


# op -> kind of dfq.statistics.activation_moments.SHAPES; in-place variants compute the same values
POINTWISE_MODULES = {
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Mish: "mish",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ELU: "elu",
    nn.LeakyReLU: "leaky_relu",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardswish: "hardswish",
}
POINTWISE_FUNCTIONS = {
    F.silu: "silu",
    F.gelu: "gelu",
    F.mish: "mish",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.sigmoid_: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.tanh_: "tanh",
    F.elu: "elu",
    F.elu_: "elu",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.hardsigmoid: "hardsigmoid",
    F.hardswish: "hardswish",
}
POINTWISE_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh"}
# the parameter that shapes a kind: module attribute = functional argument (second positional),
# default
POINTWISE_PARAMS = {
    "gelu": ("approximate", "none"),
    "elu": ("alpha", 1.0),
    "leaky_relu": ("negative_slope", 0.01),
}


def pointwise_of(gm: fx.GraphModule, node: fx.Node) -> Pointwise | None:
    """The non-clipping elementwise activation a node computes, or None."""
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    if m is not None:
        kind = POINTWISE_MODULES.get(type(m))
    elif node.op == "call_function":
        kind = POINTWISE_FUNCTIONS.get(node.target)
    else:
        kind = POINTWISE_METHODS.get(node.target) if node.op == "call_method" else None
    if kind not in POINTWISE_PARAMS:
        return None if kind is None else Pointwise(kind)
    name, default = POINTWISE_PARAMS[kind]
    if m is not None:
        return Pointwise(kind, getattr(m, name))
    return Pointwise(kind, node.kwargs.get(name, node.args[1] if len(node.args) > 1 else default))


@dataclass(frozen=True)
class BatchNormSpec:
    """What folding (and the moments) need of a BatchNorm: a module, or a functional batch_norm
    on constant running statistics (timm's BatchNormAct2d subclasses BatchNorm2d and calls
    F.batch_norm in its forward, so fx traces through it: get_attr nodes feeding a
    call_function)."""

    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor | None  # None: not affine
    beta: torch.Tensor | None
    eps: float
    layers: tuple[type, ...] = (nn.Linear, nn.Conv2d)  # what it may follow (a functional call: any)

    def output_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean beta and std |gamma| sqrt(v / (v + eps)) of its output for an input with the
        running statistics (m, v): the distribution folding remembers, and the one an unfolded
        BN (after a concatenation, say) gives the data-free moments."""
        gamma = self.gamma.detach() if self.gamma is not None else torch.ones_like(self.mean)
        beta = self.beta.detach() if self.beta is not None else torch.zeros_like(self.mean)
        return beta, gamma.abs() * torch.sqrt(self.var / (self.var + self.eps))


_BN_SIGNATURE = inspect.signature(F.batch_norm)
_BN_TENSORS = ("running_mean", "running_var", "weight", "bias")


def batchnorm_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, BatchNormSpec | str] | None:
    """(name, the BatchNorm a node computes in eval mode or why it cannot be folded), None if
    the node is no BN. A functional call is named after the module owning its statistics."""
    if node.op == "call_module" and isinstance(bn := gm.get_submodule(node.target), BATCHNORMS):
        if bn.running_mean is None:
            return node.target, "tracks no running statistics"
        return node.target, BatchNormSpec(
            bn.running_mean,
            bn.running_var,
            bn.weight if bn.affine else None,
            bn.bias if bn.affine else None,
            bn.eps,
            (nn.Linear,) if isinstance(bn, nn.BatchNorm1d) else (nn.Conv2d,),
        )
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    args = _BN_SIGNATURE.bind(*node.args, **node.kwargs)
    args.apply_defaults()
    tensors = [args.arguments[k] for k in _BN_TENSORS]
    if (
        not all(t is None or (isinstance(t, fx.Node) and t.op == "get_attr") for t in tensors)
        or None in tensors[:2]
    ):
        return node.name, "functional batch_norm without constant running statistics"
    name = tensors[0].target.rpartition(".")[0] or node.name
    if args.arguments["training"] is not False:
        return name, "functional batch_norm in training mode (batch statistics)"
    mean, var, gamma, beta = (None if t is None else attrgetter(t.target)(gm) for t in tensors)
    return name, BatchNormSpec(mean, var, gamma, beta, args.arguments["eps"])


def weighted_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, WEIGHTED):
            return m
    return None


# Every op that applies a weight to an activation: what coverage counts as a layer. dfq quantizes
# the WEIGHTED modules; the others (functional calls, other conv dimensions) are named, with why.
LAYER_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
LAYER_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    F.bilinear,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    torch.conv_transpose1d,
    torch.conv_transpose2d,
    torch.conv_transpose3d,
}


def layer_op(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The conv/linear a node computes ("Conv2d", "conv2d call", ...), or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return type(m).__name__ if isinstance(m, LAYER_MODULES) else None
    if node.op == "call_function" and node.target in LAYER_FUNCTIONS:
        return f"{node.target.__name__} call"
    return None


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if is_depthwise(m):
        return "depthwise"
    return "grouped" if m.groups > 1 else "conv"


def pads_input(m: nn.Module) -> bool:
    """True for a conv that zero-pads (shifting its input does not shift the padding)."""
    return isinstance(m, nn.Conv2d) and (m.padding == "same" or any(p > 0 for p in m.padding))


def is_eval_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Dropout, stochastic depth, drop path, nn.Identity: the identity in eval mode."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, EVAL_IDENTITY_MODULES) or type(m).__name__ in EVAL_IDENTITY_NAMES
    if node.op != "call_function" or not (
        node.target in EVAL_IDENTITY_FUNCTIONS
        or getattr(node.target, "__name__", None) in EVAL_IDENTITY_NAMES
    ):
        return False
    try:
        args = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # no signature, or not a call we understand
        return False
    args.apply_defaults()
    return args.arguments.get("training") is False


def is_spatial_mean(node: fx.Node) -> bool:
    """x.mean((2, 3), keepdim=...) / torch.mean(x, dim): an average over dimensions after the
    channels (timm's squeeze-excitation pool), i.e. a global average pool."""
    if not (
        (node.op == "call_method" and node.target == "mean")
        or (node.op == "call_function" and node.target is torch.mean)
    ):
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return (
        bool(dims)
        and all(isinstance(d, int) and d >= 2 for d in dims)
        and "dtype" not in node.kwargs
    )


def scalar_affine(node: fx.Node) -> tuple[float, float] | None:
    """(a, b) for y = a * x + b with a Python number: x * c, x / c, x + c, x - c (and c * x,
    c + x); None otherwise."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    x, c = node.args
    if isinstance(x, (int, float)) and node.target in (
        operator.mul,
        operator.add,
        torch.mul,
        torch.add,
    ):
        x, c = c, x
    if not isinstance(x, fx.Node) or not isinstance(c, (int, float)) or isinstance(c, bool):
        return None
    c = float(c)
    return {
        operator.mul: (c, 0.0),
        torch.mul: (c, 0.0),
        operator.add: (1.0, c),
        torch.add: (1.0, c),
        operator.sub: (1.0, -c),
        operator.truediv: (1 / c if c else math.nan, 0.0),
    }.get(node.target)


def is_pass_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Channel-preserving, positively homogeneous and mean-preserving (up to borders)."""
    if is_eval_identity(gm, node) or is_spatial_mean(node):
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), PASS_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:  # zero padding of H and W only
            pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
            spatial = isinstance(pad, (tuple, list)) and len(pad) <= 4
            return (
                spatial
                and node.kwargs.get("mode", "constant") == "constant"
                and not node.kwargs.get("value")
            )
        return node.target in PASS_FUNCTIONS
    if node.op == "call_method":
        return node.target in PASS_METHODS
    return False


def is_shape_query(node: fx.Node) -> bool:
    """x.shape / x.ndim / x.size() / x.dim() (timm asserts x.ndim == 4): reads no values, so
    neither folding nor scaling can change it, and it does not count as a user of x."""
    return (
        node.op == "call_function"
        and node.target is getattr
        and node.args[1] in ("shape", "ndim", "dtype", "device")
    ) or (node.op == "call_method" and node.target in ("size", "dim"))


def is_spatial_slice(node: fx.Node) -> bool:
    """x[:, :, a:b:s, c:d:t]: strided subsampling that keeps batch and channels whole."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) < 2:
        return False
    whole = slice(None, None, None)
    return idx[0] == whole and idx[1] == whole and all(isinstance(i, slice) for i in idx[2:])


def channel_slice(node: fx.Node) -> slice | None:
    """x[:, a:b] (the rest whole): a contiguous slice of the channels (GhostNet, ReXNet)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    idx = node.args[1]
    if not isinstance(idx, tuple) or len(idx) < 2 or not isinstance(idx[1], slice):
        return None
    whole = slice(None, None, None)
    if idx[0] != whole or idx[1] == whole or idx[1].step not in (None, 1):
        return None
    if not all(i == whole or i is Ellipsis for i in idx[2:]):
        return None
    return idx[1]


def channel_split(node: fx.Node, channels: int) -> list[int] | None:
    """The part sizes of torch.split / chunk along the channels (CSPNet, Res2Net, MixNet,
    ShuffleNet), else None."""
    if node.op == "call_function" and node.target in (torch.split, torch.chunk):
        kind = node.target.__name__
    elif node.op == "call_method" and node.target in ("split", "chunk"):
        kind = node.target
    else:
        return None
    if len(node.args) < 2:
        return None
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    how = node.args[1]
    if dim != 1:
        return None
    if kind == "chunk" and isinstance(how, int) and how > 0:
        size = -(-channels // how)
        return [min(size, channels - i) for i in range(0, channels, size)]
    if isinstance(how, int) and how > 0:
        return [min(how, channels - i) for i in range(0, channels, how)]
    if (
        isinstance(how, (list, tuple))
        and all(isinstance(s, int) for s in how)
        and sum(how) == channels
    ):
        return list(how)
    return None


def channel_padding(node: fx.Node) -> tuple[int, int] | None:
    """(before, after) channels of zeros that F.pad adds to an NCHW tensor (spatial pads 0)."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    if (
        mode != "constant"
        or value
        or not isinstance(pad, (tuple, list))
        or len(pad) != 6
        or any(pad[:4])
    ):
        return None
    return int(pad[4]), int(pad[5])


def keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True where the output needs no requantization (max pool, reshapes, identities, and a
    ChannelMin whose bounds were snapped onto its input's grid)."""
    key = type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target
    if key is ChannelMin or is_eval_identity(gm, node):
        return True
    return key in GRID_PRESERVING or node.target is F.pad


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add"
    )


def is_mul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in MUL_FUNCTIONS) or (
        node.op == "call_method" and node.target == "mul"
    )


def is_cat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return dim == 1


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human name for an op, for reports and error messages."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def features_per_channel_ok(first: nn.Module, second: nn.Module) -> bool:
    """second's inputs are first's output channels, each repeated k >= 1 times (flatten)."""
    n_out = first.out_features if isinstance(first, nn.Linear) else first.out_channels
    n_in = second.in_features if isinstance(second, nn.Linear) else second.in_channels
    return n_in % n_out == 0 and (n_in == n_out or isinstance(second, nn.Linear))


def is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A mean over H and W that keeps them (1 x 1): the exporter's GlobalAveragePool."""
    one = (1, (1, 1), [1, 1])
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return len(node.args) > 1 and node.args[1] in one
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in one
    if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return keep and isinstance(dims, (list, tuple)) and sorted(d % 4 for d in dims) == [2, 3]
    return False


def swap_for_module(
    gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, *srcs: fx.Node
) -> str:
    """Replace `node` by a call of `module` (added as `name`) on `srcs`; the caller recompiles."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, srcs)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return name
