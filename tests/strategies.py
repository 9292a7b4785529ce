"""Random CNN architectures for fuzzing the whole pipeline (hypothesis and plain `random`).

An architecture is drawn as a plain-data *spec* (a list of block dicts; printable, so a failing
example shows what it was), then `build(spec)` turns it into a small nn.Module that torch.fx
traces. The drawing code is written once against a tiny `Draw` interface, so hypothesis
(`architectures()`, shrinking, the test suite) and `random.Random` (`random_spec`, the
benchmarks/fuzz.py loop) share it.

Covered: stems; conv / depthwise / depthwise-multiplier / grouped conv with odd channel counts,
strides, dilation, 'same' and reflect padding; BatchNorm (affine or not, with or without
running statistics; module, or timm's BatchNormAct2d calling F.batch_norm) or none; ReLU
(module, in-place, functional, method), ReLU6 (module, functional), Hardtanh, identity and
smooth activations (LeakyReLU, Hardswish, Hardsigmoid, SiLU, GELU (erf, tanh), Mish, ELU,
Sigmoid, Tanh; modules, functions, methods); squeeze-excitation gates; residual adds (with or
without an activation after, with or without stochastic depth / drop path / Dropout2d on the
branch); concatenations (two branches, or a branch and its input); max/avg pooling (module and
functional); zero padding (module and F.pad); upsampling; dropout; heads: global pool + flatten +
linear (optionally linear-BN1d-act-linear), flatten + linear, or a 1x1 conv. Parameters: dead
(all-zero) output channels, BN gammas that are zero, tiny (1e-6) or huge (1e3).

The modern-CNN features (smooth activations beyond the first five, gates, functional BN, drops)
are drawn last, by `_modern`, so that every earlier seed keeps the layers it had.
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

ACTIVATIONS = (
    "relu",
    "relu_inplace",
    "relu_fn",
    "relu_method",
    "relu6",
    "relu6_fn",
    "hardtanh06",
    "identity",
    "leaky",
    "hardswish",
    "silu",
    "sigmoid",
    "tanh",
)
SMOOTH_ACTIVATIONS = (
    "gelu",
    "gelu_tanh",
    "mish",
    "elu",
    "hardsigmoid",
    "silu_fn",
    "sigmoid_method",
    "leaky_fn",
    "hardswish_fn",
)
DROPS = ("StochasticDepth", "drop_path", "dropout2d")
GAMMA_KINDS = ("normal", "normal", "normal", "tiny", "huge", "zero", "negative")


# --------------------------------------------------------------------------- drawing interface
class Draw:
    """What the spec generator needs; implemented for hypothesis and for random.Random."""

    def choice(self, options: Sequence[Any]) -> Any: ...
    def integer(self, lo: int, hi: int) -> int: ...
    def boolean(self, p: float = 0.5) -> bool: ...


class RandomDraw(Draw):
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def choice(self, options):
        return self.r.choice(list(options))

    def integer(self, lo, hi):
        return self.r.randint(lo, hi)

    def boolean(self, p=0.5):
        return self.r.random() < p


class HypothesisDraw(Draw):
    def __init__(self, draw):
        from hypothesis import strategies as st

        self.st, self.draw = st, draw

    def choice(self, options):
        return self.draw(self.st.sampled_from(list(options)))

    def integer(self, lo, hi):
        return self.draw(self.st.integers(lo, hi))

    def boolean(self, p=0.5):
        # a weighted coin that still shrinks towards False
        return self.draw(self.st.integers(0, 99)) < round(100 * p)


# --------------------------------------------------------------------------- specs
def _conv(d: Draw, cin: int, hw: int, cout: int | None = None, keep_size: bool = False) -> dict:
    kind = d.choice(["conv", "conv", "conv", "dw", "dw", "dw_mult", "grouped"])
    if cout is None:
        cout = d.integer(1, 13)
    groups = 1
    if kind == "dw":
        groups, cout = cin, cin
    elif kind == "dw_mult":
        groups, cout = cin, cin * d.integer(2, 3)
    elif kind == "grouped":
        divisors = [g for g in range(2, cin + 1) if cin % g == 0]
        if divisors:
            groups = d.choice(divisors)
            cout = groups * d.integer(1, 3)
        else:
            kind = "conv"
    k = d.choice([1, 3, 3, 5]) if hw >= 5 else d.choice([1, 3])
    dilation = 2 if k == 3 and hw >= 6 and d.boolean(0.15) else 1
    if keep_size:
        stride, padding = 1, d.choice(["same", k // 2 * dilation])
    else:
        stride = 2 if hw >= 4 and d.boolean(0.3) else 1
        padding = (
            d.choice([0, k // 2 * dilation]) if hw > (k - 1) * dilation + 1 else k // 2 * dilation
        )
        if stride == 1 and d.boolean(0.1):
            padding = "same"
    padding_mode = (
        "reflect" if padding not in (0, "same") and padding < hw and d.boolean(0.1) else "zeros"
    )
    return {
        "kind": kind,
        "cin": cin,
        "cout": cout,
        "k": k,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": d.boolean(0.4),
        "padding_mode": padding_mode,
        "dead": d.integer(1, cout) if cout > 1 and d.boolean(0.15) else 0,
    }


def _out_hw(c: dict, hw: int) -> int:
    if c["padding"] == "same":
        return hw
    eff = (c["k"] - 1) * c["dilation"] + 1
    return (hw + 2 * c["padding"] - eff) // c["stride"] + 1


def _bn(d: Draw, channels: int) -> dict | None:
    if not d.boolean(0.7):
        return None
    return {
        "affine": d.boolean(0.9),
        "track": d.boolean(0.95),
        "gammas": [d.choice(GAMMA_KINDS) for _ in range(min(channels, 3))],
    }


def _unit(
    d: Draw, cin: int, hw: int, cout: int | None = None, keep_size: bool = False
) -> tuple[dict, int, int]:
    """conv [+ BN] [+ activation]: the basic layer of every block."""
    c = _conv(d, cin, hw, cout, keep_size)
    return (
        {"conv": c, "bn": _bn(d, c["cout"]), "act": d.choice(ACTIVATIONS)},
        c["cout"],
        _out_hw(c, hw),
    )


def spec_from(d: Draw, max_blocks: int = 5) -> dict:
    """A random architecture spec: input size, stem, blocks, head."""
    hw = d.integer(4, 12)
    stem, c, h = _unit(d, 3, hw)
    blocks = []
    for _ in range(d.integer(0, max_blocks)):
        options = ["unit", "unit", "residual", "concat", "pool", "pad", "dropout", "act"]
        if h <= 8:
            options.append("upsample")
        kind = d.choice(options)
        if kind == "unit":
            u, c2, h2 = _unit(d, c, h)
            if h2 < 1:
                continue
            blocks.append({"kind": "unit", "unit": u})
            c, h = c2, h2
        elif kind == "residual":
            n = d.integer(1, 2)
            body, cc = [], c
            for i in range(n):
                u, cc, _ = _unit(d, cc, h, cout=c if i == n - 1 else None, keep_size=True)
                if u["conv"]["cout"] != (c if i == n - 1 else cc):  # dw_mult / grouped changed it
                    u["conv"].update(kind="conv", groups=1, cout=c if i == n - 1 else cc)
                    cc = u["conv"]["cout"]
                    u["conv"]["dead"] = min(u["conv"]["dead"], cc)
                body.append(u)
            blocks.append(
                {
                    "kind": "residual",
                    "body": body,
                    "post": d.choice(ACTIVATIONS),
                    "method": d.boolean(0.2),
                }
            )
        elif kind == "concat":
            a, ca, _ = _unit(d, c, h, keep_size=True)
            b = _unit(d, c, h, keep_size=True)[0] if d.boolean(0.6) else None
            cb = b["conv"]["cout"] if b else c
            blocks.append({"kind": "concat", "a": a, "b": b})
            c = ca + cb
        elif kind == "pool" and h >= 2:
            blocks.append({"kind": "pool", "op": d.choice(["max", "avg", "max_fn", "avg_fn"])})
            h = h // 2
        elif kind == "pad":
            p = d.integer(1, 2)
            blocks.append({"kind": "pad", "op": d.choice(["module", "fn"]), "p": p})
            h += 2 * p
        elif kind == "upsample":
            blocks.append({"kind": "upsample", "mode": d.choice(["nearest", "bilinear"])})
            h *= 2
        elif kind == "dropout":
            blocks.append({"kind": "dropout"})
        elif kind == "act":
            blocks.append({"kind": "act", "act": d.choice(ACTIVATIONS)})
    heads = ["gap_linear", "gap_linear", "conv"]
    if c * h * h <= 400:
        heads.append("flatten_linear")
    head = {"kind": d.choice(heads), "out": d.integer(1, 10)}
    if head["kind"] == "gap_linear" and d.boolean(0.3):
        head["hidden"] = {"n": d.integer(2, 12), "bn": _bn(d, 3), "act": d.choice(ACTIVATIONS)}
    return {
        "hw": hw,
        "stem": stem,
        "blocks": blocks,
        "head": head,
        "channels": c,
        "out_hw": h,
        "seed": d.integer(0, 2**31 - 1),
    }


def _units(spec: dict) -> list[dict]:
    units = [spec["stem"]]
    for b in spec["blocks"]:
        units += (
            [b["unit"]]
            if b["kind"] == "unit"
            else b["body"]
            if b["kind"] == "residual"
            else ([u for u in (b["a"], b["b"]) if u] if b["kind"] == "concat" else [])
        )
    return units


def _modern(d: Draw, spec: dict) -> dict:
    """Add what modern CNN families use (EfficientNet, MobileNetV3, timm): smooth activations,
    BatchNormAct2d (F.batch_norm), squeeze-excitation gates after units, stochastic depth on
    residual branches. Drawn after the rest, so the layers of older seeds stay as they were."""
    for u in _units(spec):
        if d.boolean(0.25):
            u["act"] = d.choice(SMOOTH_ACTIVATIONS)
        if u["bn"] is not None and d.boolean(0.2):
            u["bn"]["functional"] = True
    for b in spec["blocks"]:
        if b["kind"] == "unit" and d.boolean(0.25):
            b["unit"]["se"] = {
                "squeeze": d.integer(1, 4),
                "act": d.choice(["relu", "silu"]),
                "gate": d.choice(["sigmoid", "hardsigmoid"]),
                "gate_first": d.boolean(),
            }
        if b["kind"] == "residual" and d.boolean(0.4):
            b["drop"] = d.choice(DROPS)
    return spec


def random_spec(seed: int, modern: bool = True) -> dict:
    """Architecture `seed`; modern=False: without the features `_modern` adds (as drawn
    before they existed)."""
    d = RandomDraw(seed)
    spec = spec_from(d)
    return _modern(d, spec) if modern else spec


def architectures():
    """Hypothesis strategy of architecture specs (build one with `build(spec)`)."""
    from hypothesis import strategies as st

    @st.composite
    def _arch(draw):
        d = HypothesisDraw(draw)
        return _modern(d, spec_from(d))

    return _arch()


# --------------------------------------------------------------------------- building
FUNCTIONAL_ACTS = {
    "relu_fn": F.relu,
    "relu_method": lambda x: x.relu(),
    "relu6_fn": F.relu6,
    "hardtanh06": lambda x: F.hardtanh(x, 0.0, 6.0),
    "silu_fn": F.silu,
    "sigmoid_method": lambda x: x.sigmoid(),
    "leaky_fn": lambda x: F.leaky_relu(x, 0.2),
    "hardswish_fn": F.hardswish,
}


class Act(nn.Module):
    """Activations that fx inlines as call_function / call_method nodes."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        return FUNCTIONAL_ACTS[self.kind](x)


def make_act(kind: str) -> nn.Module:
    simple = {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "identity": nn.Identity,
        "hardswish": nn.Hardswish,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "mish": nn.Mish,
        "hardsigmoid": nn.Hardsigmoid,
    }
    if kind in simple:
        return simple[kind]()
    special = {
        "relu_inplace": lambda: nn.ReLU(inplace=True),
        "leaky": lambda: nn.LeakyReLU(0.1),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "elu": lambda: nn.ELU(0.7),
    }
    return special[kind]() if kind in special else Act(kind)


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """timm's drop_path (fx.wrap keeps it one call in the graph, as a leaf DropPath would)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


torch.fx.wrap("drop_path")


class Drop(nn.Module):
    """Stochastic depth on a residual branch: the identity in eval mode. torchvision's module
    leaves a call_function stochastic_depth (fx.wrap'd in torchvision; called from here it would
    be traced away)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.module = {
            "StochasticDepth": lambda: StochasticDepth(0.2, "row"),
            "dropout2d": lambda: nn.Dropout2d(0.2),
        }.get(kind, nn.Identity)()

    def forward(self, x):
        if self.kind == "drop_path":
            return drop_path(x, 0.2, self.training)
        return self.module(x)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, its normalisation part: a BatchNorm2d subclass calling F.batch_norm
    (fx traces through it) after asserting a 4-D input (shape reads of the conv output)."""

    def forward(self, x):
        torch._assert(x.ndim == 4, "expected a 4D input")
        use_batch = self.training or self.running_mean is None
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch,
            0.1 if self.training else 0.0,
            self.eps,
        )


class SqueezeExcite(nn.Module):
    """x * gate(fc2(act(fc1(pool(x))))), gate first (torchvision) or input first (timm)."""

    def __init__(self, spec: dict, c: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, spec["squeeze"], 1), nn.Conv2d(spec["squeeze"], c, 1)
        self.act, self.gate = make_act(spec["act"]), make_act(spec["gate"])
        self.gate_first = spec["gate_first"]

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return s * x if self.gate_first else x * s


def _gammas(g: torch.Generator, n: int, kinds: list[str]) -> torch.Tensor:
    gamma = torch.rand(n, generator=g) * 1.5 + 0.2
    special = {"tiny": 1e-6, "huge": 1e3, "zero": 0.0, "negative": -0.7}
    for i, kind in enumerate(kinds):
        if kind in special and n > 1:  # keep at least one ordinary channel... unless n == 1
            gamma[(i * 7919) % n] = special[kind]
    return gamma


def _build_bn(spec: dict | None, n: int, g: torch.Generator, dim: int = 2) -> nn.Module | None:
    if spec is None:
        return None
    cls = (
        (BatchNormAct2d if spec.get("functional") else nn.BatchNorm2d)
        if dim == 2
        else nn.BatchNorm1d
    )
    bn = cls(n, affine=spec["affine"], track_running_stats=spec["track"])
    with torch.no_grad():
        if spec["affine"]:
            bn.weight.copy_(_gammas(g, n, spec["gammas"]))
            bn.bias.copy_(torch.randn(n, generator=g) * 0.5)
        if spec["track"]:
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return bn


def _build_unit(u: dict, g: torch.Generator) -> nn.Sequential:
    c = u["conv"]
    conv = nn.Conv2d(
        c["cin"],
        c["cout"],
        c["k"],
        c["stride"],
        c["padding"],
        c["dilation"],
        c["groups"],
        bias=c["bias"],
        padding_mode=c["padding_mode"],
    )
    with torch.no_grad():
        fan_in = conv.weight[0].numel()
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(c["cout"], generator=g) * 0.2)
        if c["dead"]:  # an all-zero output channel (pruned / dead filter)
            conv.weight[c["dead"] - 1].zero_()
            if conv.bias is not None:
                conv.bias[c["dead"] - 1] = 0.0
    layers = [conv]
    bn = _build_bn(u["bn"], c["cout"], g)
    if bn is not None:
        layers.append(bn)
    layers.append(make_act(u["act"]))
    if "se" in u:
        layers.append(SqueezeExcite(u["se"], c["cout"]))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(
        self, body: nn.Module, post: nn.Module, method: bool, drop: nn.Module | None = None
    ):
        super().__init__()
        self.body, self.post, self.method, self.drop = body, post, method, drop

    def forward(self, x):
        y = self.body(x) if self.drop is None else self.drop(self.body(x))
        return self.post(y.add(x) if self.method else x + y)


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module | None):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x) if self.b is not None else x], 1)


class Functional(nn.Module):
    """Pooling, padding and upsampling written as F.* calls (fx sees call_function nodes)."""

    def __init__(self, op: str, arg: Any = None):
        super().__init__()
        self.op, self.arg = op, arg

    def forward(self, x):
        if self.op == "max_fn":
            return F.max_pool2d(x, 2)
        if self.op == "avg_fn":
            return F.avg_pool2d(x, 2)
        if self.op == "pad":
            return F.pad(x, (self.arg,) * 4)
        return F.interpolate(x, scale_factor=2.0, mode=self.arg)


class Head(nn.Module):
    def __init__(self, spec: dict, channels: int, hw: int, g: torch.Generator):
        super().__init__()
        self.kind = spec["kind"]
        if self.kind == "conv":
            self.out = nn.Conv2d(channels, spec["out"], 1)
        elif self.kind == "flatten_linear":
            self.out = nn.Sequential(
                nn.Flatten(), nn.Dropout(0.2), nn.Linear(channels * hw * hw, spec["out"])
            )
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
            layers: list[nn.Module] = []
            n = channels
            if "hidden" in spec:
                h = spec["hidden"]
                layers.append(nn.Linear(channels, h["n"]))
                bn = _build_bn(h["bn"], h["n"], g, dim=1)
                if bn is not None:
                    layers.append(bn)
                layers.append(make_act(h["act"]))
                n = h["n"]
            layers.append(nn.Linear(n, spec["out"]))
            self.out = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                with torch.no_grad():
                    fan_in = m.weight[0].numel()
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(fan_in))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)

    def forward(self, x):
        if self.kind == "gap_linear":
            return self.out(torch.flatten(self.pool(x), 1))
        return self.out(x)


class RandomNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        g = torch.Generator().manual_seed(spec["seed"])
        self.stem = _build_unit(spec["stem"], g)
        blocks: list[nn.Module] = []
        for b in spec["blocks"]:
            k = b["kind"]
            if k == "unit":
                blocks.append(_build_unit(b["unit"], g))
            elif k == "residual":
                body = nn.Sequential(*[_build_unit(u, g) for u in b["body"]])
                drop = Drop(b["drop"]) if "drop" in b else None
                blocks.append(Residual(body, make_act(b["post"]), b["method"], drop))
            elif k == "concat":
                blocks.append(
                    Concat(_build_unit(b["a"], g), _build_unit(b["b"], g) if b["b"] else None)
                )
            elif k == "pool":
                blocks.append(
                    {"max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(2)}.get(
                        b["op"], lambda: Functional(b["op"])
                    )()
                )
            elif k == "pad":
                blocks.append(
                    nn.ZeroPad2d(b["p"]) if b["op"] == "module" else Functional("pad", b["p"])
                )
            elif k == "upsample":
                blocks.append(Functional("upsample", b["mode"]))
            elif k == "dropout":
                blocks.append(nn.Dropout(0.3))
            elif k == "act":
                blocks.append(make_act(b["act"]))
        self.blocks = nn.Sequential(*blocks)
        self.head = Head(spec["head"], spec["channels"], spec["out_hw"], g)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def build(spec: dict) -> RandomNet:
    """The model of a spec, in eval mode, float32, deterministic in spec['seed']."""
    return RandomNet(spec).eval()


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


def example_input(spec: dict, batch: int = 4, dtype=torch.float32) -> torch.Tensor:
    """Random images in [0, 1], normalised as the pipeline's default input statistics say."""
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    images = torch.rand(batch, 3, spec["hw"], spec["hw"], generator=g)
    return ((images - IMAGENET_MEAN) / IMAGENET_STD).to(dtype)
