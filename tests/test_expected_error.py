"""Ranges of least expected error (dfq.quant.expected_error) against brute force on samples,
the activation mean shift against Monte Carlo, and the rule in the pipeline."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dfq import PipelineConfig, QuantConfig, fold_batchnorm, propagate, quantize_model, trace
from dfq.config import DISTILLED_PERCENTILE, Grid
from dfq.errors import DfqError
from dfq.quant.activations import quantizer_nodes
from dfq.quant.expected_error import ClippedChannels, Samples, best_range, expected_error
from dfq.quant.primitives import fake_quantize, qparams

MU = torch.tensor([-0.4, 0.0, 0.3, 0.9, 1.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.0, 0.3, 0.8, 1.2], dtype=torch.float64)
CLIPS = {"none": (-math.inf, math.inf), "relu": (0.0, math.inf), "relu6": (0.0, 2.0)}


def _draw(shape: str, a: float, b: float, n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """n values of each channel (rows), clipped to [a, b]."""
    g = torch.Generator().manual_seed(seed)
    if shape == "normal":
        z = torch.randn(len(MU), n, generator=g, dtype=torch.float64)
    else:  # Laplace of unit variance: sign * Exp(1) / sqrt(2)
        u = torch.rand(len(MU), n, generator=g, dtype=torch.float64)
        e = -torch.log(torch.rand(len(MU), n, generator=g, dtype=torch.float64))
        z = torch.where(u < 0.5, -e, e) / math.sqrt(2)
    return (MU[:, None] + SIGMA[:, None] * z).clamp(a, b)


def _mse(x: torch.Tensor, lo: float, hi: float, grid: Grid) -> float:
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), grid)
    return float(((fake_quantize(x, scale, zp, grid) - x) ** 2).mean())


def _brute_force(x: torch.Tensor, grid: Grid, steps: int = 120) -> float:
    """The least fake-quant MSE over a grid of ranges [lo, hi] (lo = 0 for rectified values;
    lo = -hi on a symmetric grid)."""
    lo_end, hi_end = min(float(x.min()), 0.0), float(x.max())
    t = torch.linspace(0.05, 1, steps).tolist()
    if grid.symmetric:
        pairs = [(-h * max(-lo_end, hi_end), h * max(-lo_end, hi_end)) for h in t]
    elif lo_end == 0:
        pairs = [(0.0, h * hi_end) for h in t]
    else:
        pairs = [(l * lo_end, h * hi_end) for l in t[::4] for h in t[::4]]
    return min(_mse(x, lo, hi, grid) for lo, hi in pairs)


# Laplace at 8 bits unclipped: the best range sits ~7 std out, where 200k draws hold a handful
# of values, so a sample's own optimum is noise; those cases are left to the normal's
CASES = [("normal", c, b) for c in CLIPS for b in (4, 8)] + [
    ("laplace", "none", 4),
    ("laplace", "relu", 4),
    ("laplace", "relu6", 4),
    ("laplace", "relu6", 8),
]


@pytest.mark.parametrize("shape,clip,bits", CASES)
def test_best_range_matches_brute_force_on_samples(shape, clip, bits):
    a, b = CLIPS[clip]
    grid = Grid(bits, symmetric=False)
    x = _draw(shape, a, b)
    dist = ClippedChannels(MU, SIGMA, torch.full_like(MU, a), torch.full_like(MU, b), shape)
    lo, hi = best_range(dist, grid)
    achieved = _mse(x, lo, hi, grid)
    assert achieved <= 1.03 * _brute_force(x, grid)
    # the uniform-rounding model predicts the error it achieves
    assert expected_error(dist, lo, hi, grid) == pytest.approx(achieved, rel=0.06)
    # and the same search on the samples themselves lands on the same error
    assert _mse(x, *best_range(Samples(x), grid), grid) == pytest.approx(achieved, rel=0.03)


@pytest.mark.parametrize("bits", [4, 8])
def test_best_range_on_a_symmetric_grid(bits):
    grid = Grid(bits, symmetric=True)
    x = _draw("normal", -math.inf, math.inf)
    inf = torch.full_like(MU, math.inf)
    dist = ClippedChannels(MU, SIGMA, -inf, inf, "normal")
    lo, hi = best_range(dist, grid)
    assert lo == -hi
    assert _mse(x, lo, hi, grid) <= 1.03 * _brute_force(x, grid)


def test_the_range_narrows_with_the_bit_width_and_beats_six_std():
    dist = ClippedChannels(MU, SIGMA, torch.zeros_like(MU), torch.full_like(MU, math.inf), "normal")
    highs = [best_range(dist, Grid(bits, False))[1] for bits in (4, 6, 8)]
    assert highs[0] < highs[1] < highs[2] < float((MU + 6 * SIGMA).max())
    x = _draw("normal", 0.0, math.inf)
    six_std = _mse(x, 0.0, float((MU + 6 * SIGMA).max()), Grid(8, False))
    assert _mse(x, 0.0, highs[2], Grid(8, False)) < 0.7 * six_std


@pytest.mark.parametrize("shape", ["normal", "laplace"])
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mean_shift_matches_monte_carlo(shape, clip, bits):
    """E[Q(X)] - E[X] per channel: clipping and rounding, against 400k draws per channel."""
    a, b = CLIPS[clip]
    grid = Grid(bits, symmetric=False)
    dist = ClippedChannels(MU, SIGMA, torch.full_like(MU, a), torch.full_like(MU, b), shape)
    lo, hi = best_range(dist, grid)
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), grid)
    x = _draw(shape, a, b, n=400_000, seed=1)
    measured = (fake_quantize(x, scale, zp, grid) - x).mean(1)
    predicted = dist.shift(float(scale), int(zp), grid)
    # Monte Carlo standard error of a mean of errors within one step: below step / sqrt(12 n)
    tol = 5 * float(scale) / math.sqrt(12 * x.shape[1]) + 1e-6
    assert torch.allclose(predicted, measured, atol=tol), (predicted, measured)


def test_samples_terms_equal_direct_sums():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.0, 0.3, 1.0, 4.0], dtype=torch.float64)
    (clip_lo, below), (clip_hi, inside) = Samples(x).side_terms(
        torch.tensor([-1.0]), torch.tensor([0.5])
    )
    assert float(clip_hi) == pytest.approx((0.5**2 + 3.5**2) / 7)
    assert float(clip_lo) == pytest.approx(1.0 / 7)
    assert float(inside - below) == pytest.approx(2 / 7)  # -0.5 and 0.3; the zeros are exact
    (_, below), (_, inside) = Samples(x).side_terms(torch.tensor([-0.5]), torch.tensor([1.0]))
    assert float(inside - below) == pytest.approx(1 / 7)  # values on a bound are on the grid


def test_mse_rule_narrows_the_ranges_and_act_correction_moves_biases(small_net):
    std = quantize_model(small_net, PipelineConfig(range_rule="std"))
    mse = quantize_model(small_net, PipelineConfig(range_rule="mse"))
    x = next(n for n in std.model.graph.nodes if n.op == "placeholder").name
    for name, rec in mse.activations.items():
        lo, hi = rec.activation_range
        lo6, hi6 = std.activations[name].activation_range
        if name == x:  # the network input keeps its exact range
            assert (lo, hi) == (lo6, hi6)
        elif name.startswith(("stem", "dw")):  # before the residual add: narrower
            assert lo6 <= lo <= hi <= hi6 and (lo, hi) != (lo6, hi6)
        else:  # the add's operands are correlated under mse: its spread is larger
            assert (lo, hi) != (lo6, hi6)
    # at 4 bits the shifts are well above a bias step (8-bit ones mostly round away)
    a4 = PipelineConfig(range_rule="mse", quant=QuantConfig(bits_activation=4))
    plain = quantize_model(small_net, a4)
    corrected = quantize_model(small_net, dataclasses.replace(a4, act_correction=True))
    moved = {k: r.activation_bias_correction_max for k, r in corrected.layers.items()}
    assert all(moved[k] > 0 for k in ("stem.0", "dw.0", "pw.0", "head.0", "fc")), moved
    assert len(quantizer_nodes(corrected.model)) == len(quantizer_nodes(plain.model))
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        assert not torch.equal(corrected.model(x), plain.model(x))


def test_mse_rule_on_data_picks_the_samples_best_range(small_net):
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    res = quantize_model(small_net, PipelineConfig(calib=16, range_rule="mse"), calib_data=data)
    minmax = quantize_model(small_net, PipelineConfig(calib=16), calib_data=data)
    narrower = [
        name
        for name, rec in res.activations.items()
        if rec.activation_range[1] < minmax.activations[name].activation_range[1] - 1e-6
    ]
    assert narrower  # the tails of the data are clipped where that costs less than rounding


def test_auto_ranges_are_mse_from_moments_and_std_on_data():
    assert PipelineConfig().range_rule == "mse"
    assert PipelineConfig(calib=8).range_rule == "std"
    distilled = PipelineConfig(distill_range=True)
    assert distilled.range_rule == "std" and distilled.range_percentile == DISTILLED_PERCENTILE
    assert PipelineConfig(distill_range=True, range_rule="mse").range_percentile is None


def test_bad_range_options_are_refused():
    with pytest.raises(DfqError, match="range_rule"):
        PipelineConfig(range_rule="percentile")
    with pytest.raises(DfqError, match="act_correction"):
        PipelineConfig(act_correction=True, correction="data")


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_add_correlation_sets_the_residual_sum_variance(small_net, rho):
    from dfq.statistics.moments import input_moments

    folded = fold_batchnorm(trace(small_net))
    gm = folded.gm
    inputs = input_moments((0.5,) * 3, (0.25,) * 3)
    out = propagate(gm, folded.stats, inputs, add_correlation=rho)
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and "add" in n.name)
    a, b = (out[x.name] for x in add.args)
    expected = a.var + b.var + 2 * rho * (a.var * b.var).sqrt()
    assert torch.allclose(out[add.name].var, expected)
    assert torch.allclose(out[add.name].mean, a.mean + b.mean)
