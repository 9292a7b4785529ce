"""Moments and ranges of smooth activations of a normal, against Monte Carlo; their op table.

Tolerance: the Monte Carlo estimate of a mean has standard error sd(f(X)) / sqrt(N), of a variance
sqrt((mu_4 - var^2) / N) (both estimated from the same samples); our figures must lie within 5 of
those (the quadrature and the closed forms are accurate to ~1e-9 of a std, so the whole error is
Monte Carlo noise; with a fixed seed the test is deterministic, and at 5 standard errors it is not
a coin toss for the next seed either), plus 1e-9 for the degenerate channels (sigma = 0: no noise).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from dfq import PipelineConfig, fold_batchnorm, propagate, quantize_model, trace
from dfq.graph.ops import pointwise_of
from dfq.statistics.activation_moments import SHAPES, activation_moments, activation_range, evaluate
from dfq.statistics.moments import input_moments

KINDS = [
    ("silu", None),
    ("gelu", "none"),
    ("gelu", "tanh"),
    ("mish", None),
    ("sigmoid", None),
    ("tanh", None),
    ("elu", 1.0),
    ("elu", 0.5),
    ("leaky_relu", 0.1),
    ("hardsigmoid", None),
    ("hardswish", None),
]
TORCH = {
    "silu": F.silu,
    "gelu": lambda x, p: F.gelu(x, approximate=p),
    "mish": F.mish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "elu": lambda x, p: F.elu(x, p),
    "leaky_relu": lambda x, p: F.leaky_relu(x, p),
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
}
# sigma tiny, ~1 and huge (1e3: the nonlinearity is a speck on the scale of the std),
# at kinks and far out
MU = torch.tensor(
    [0.0, 0.3, -2.0, 1.0, -3.0, 3.0, 0.0, 2.0, -50.0, 0.0, 5.0, -1.3], dtype=torch.float64
)
SD = torch.tensor(
    [1e-6, 0.1, 1.0, 1.0, 0.5, 2.0, 10.0, 30.0, 100.0, 1000.0, 0.0, 0.0], dtype=torch.float64
)
N = 1_000_000


def _torch_f(kind, param):
    f = TORCH[kind]
    return (lambda x: f(x, param)) if param is not None else f


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    return MU + SD * torch.randn(N, MU.numel(), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind,param", KINDS)
def test_moments_match_monte_carlo(kind, param, samples):
    y = _torch_f(kind, param)(samples)
    mean, var = activation_moments(kind, param, MU, SD**2)
    mc_mean, mc_var = y.mean(0), y.var(0)
    se_mean = (mc_var / N).sqrt()
    se_var = ((((y - mc_mean) ** 4).mean(0) - mc_var**2).clamp_min(0) / N).sqrt()
    assert ((mean - mc_mean).abs() <= 5 * se_mean + 1e-9).all(), (mean - mc_mean) / se_mean
    assert ((var - mc_var).abs() <= 5 * se_var + 1e-9).all(), (var - mc_var) / se_var


@pytest.mark.parametrize("kind,param", KINDS)
def test_range_holds_the_monte_carlo_quantiles(kind, param, samples):
    y = _torch_f(kind, param)(samples[: N // 4])
    q = torch.quantile(y, torch.tensor([1e-4, 1 - 1e-4], dtype=torch.float64), dim=0)
    lo, hi = activation_range(kind, param, MU - 6 * SD, MU + 6 * SD)
    assert (lo <= q[0]).all() and (hi >= q[1]).all()
    assert (lo <= hi).all()


@pytest.mark.parametrize("kind,param", KINDS)
def test_degenerate_and_infinite_inputs_give_no_nan(kind, param):
    mean, var = activation_moments(kind, param, MU.float(), torch.zeros(MU.numel()))
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all() and (var == 0).all()
    assert torch.allclose(mean, _torch_f(kind, param)(MU.float()), atol=1e-6)
    inf = torch.tensor([-math.inf, math.inf], dtype=torch.float64)
    assert not evaluate(kind, param, inf).isnan().any()
    lo, hi = activation_range(kind, param, torch.full((1,), -math.inf), torch.full((1,), math.inf))
    assert not (lo.isnan() | hi.isnan()).any()


@pytest.mark.parametrize("kind,param", KINDS)
def test_pieces_are_the_torch_functions_and_minima_are_minima(kind, param):
    x = torch.linspace(-60, 60, 100_001, dtype=torch.float64)
    f = _torch_f(kind, param)
    assert torch.allclose(evaluate(kind, param, x), f(x), atol=1e-12, rtol=1e-12)
    lo, _ = activation_range(kind, param, x[:1], x[-1:])
    grid_min = float(f(x).min())  # the true minimum is at most a grid step's curvature (1e-6) lower
    assert grid_min - 1e-6 <= float(lo) <= grid_min
    _, x_min = SHAPES[kind](param)
    if x_min is not None and kind not in (
        "elu",
        "leaky_relu",
    ):  # those two: 0 is merely a safe extra point
        x0 = torch.tensor(x_min, dtype=torch.float64, requires_grad=True)
        assert abs(float(torch.autograd.grad(f(x0), x0)[0])) < 1e-12


@pytest.mark.parametrize(
    "kind,expected",
    [("silu", -0.2785), ("gelu", -0.1700), ("mish", -0.3088), ("hardswish", -0.375)],
)
def test_range_takes_the_interior_minimum(kind, expected):
    lo, _ = activation_range(kind, None, torch.tensor([-5.0]), torch.tensor([5.0]))
    assert float(lo) == pytest.approx(expected, abs=1e-4)


class _Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


OPS = [
    (nn.SiLU(), ("silu", None)),
    (nn.SiLU(inplace=True), ("silu", None)),
    (nn.GELU(), ("gelu", "none")),
    (nn.GELU(approximate="tanh"), ("gelu", "tanh")),
    (nn.Hardswish(), ("hardswish", None)),
    (nn.Hardsigmoid(), ("hardsigmoid", None)),
    (nn.Sigmoid(), ("sigmoid", None)),
    (nn.Tanh(), ("tanh", None)),
    (nn.LeakyReLU(0.2), ("leaky_relu", 0.2)),
    (nn.Mish(), ("mish", None)),
    (nn.ELU(0.7), ("elu", 0.7)),
    (_Functional(F.silu), ("silu", None)),
    (_Functional(lambda x: F.gelu(x, approximate="tanh")), ("gelu", "tanh")),
    (_Functional(torch.sigmoid), ("sigmoid", None)),
    (_Functional(lambda x: x.sigmoid()), ("sigmoid", None)),
    (_Functional(lambda x: x.tanh_()), ("tanh", None)),
    (_Functional(lambda x: F.leaky_relu(x, 0.3)), ("leaky_relu", 0.3)),
    (_Functional(F.leaky_relu), ("leaky_relu", 0.01)),
    (_Functional(lambda x: F.elu(x, alpha=0.5)), ("elu", 0.5)),
    (_Functional(F.hardswish), ("hardswish", None)),
    (_Functional(F.hardsigmoid), ("hardsigmoid", None)),
    (_Functional(F.mish), ("mish", None)),
    (_Functional(torch.tanh), ("tanh", None)),
]


@pytest.mark.parametrize("act,expected", OPS)
def test_op_table_recognises_modules_functions_and_methods(act, expected):
    torch.manual_seed(0)
    net = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), act, nn.Conv2d(4, 2, 1))
    )
    folded = fold_batchnorm(trace(net))
    nodes = list(folded.gm.graph.nodes)
    found = [(p.kind, p.param) for n in nodes if (p := pointwise_of(folded.gm, n)) is not None]
    assert found == [expected]
    moments = propagate(folded.gm, folded.stats, input_moments((0.5,) * 3, (0.25,) * 3))
    assert all(n.name in moments for n in nodes if n.op != "output")


def test_swish_net_gets_every_activation_range():
    """conv-BN-SiLU -> conv-BN-Hardswish -> pool -> linear: every quantizer has a data-free range
    (before, everything after the first SiLU had none), and the ranges hold the real activations."""
    torch.manual_seed(0)
    net = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.SiLU(),
            nn.Conv2d(8, 8, 1),
            nn.BatchNorm2d(8),
            nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 8),
            nn.GELU(),
            nn.Linear(8, 3),
        )
    )
    res = quantize_model(net, PipelineConfig(correction=True))
    assert res.activations and all(a.activation_range is not None for a in res.activations.values())
