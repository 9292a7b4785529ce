"""Clipped-normal moments against Monte Carlo, and data-free bias correction on a small net."""

import math

import pytest
import torch
from conftest import randomize_bn
from torch import nn

from dfq import PipelineConfig, QuantConfig, fold_batchnorm, propagate, trace
from dfq.quant.weights import quantize_weights
from dfq.statistics.moments import Moments, clipped_normal_moments
from dfq.transforms.bias_correct import correct_bias


@pytest.mark.parametrize("lo,hi", [(0.0, math.inf), (0.0, 6.0), (-1.0, 1.0), (-math.inf, math.inf)])
def test_clipped_normal_moments_match_monte_carlo(lo, hi):
    g = torch.Generator().manual_seed(0)
    mean = torch.tensor([-2.0, 0.0, 0.7, 3.0, 5.5], dtype=torch.float64)
    std = torch.tensor([1.0, 0.5, 2.0, 1.5, 0.0], dtype=torch.float64)
    x = mean + std * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    y = x.clamp(lo, hi)
    e, v = clipped_normal_moments(mean, std, lo, hi)
    assert torch.allclose(e, y.mean(0), atol=0.01)
    assert torch.allclose(v, y.var(0), atol=0.03)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))


def test_bias_correction_removes_the_mean_shift_monte_carlo():
    """With data that follows the BN statistics, the corrected 4-bit layer's mean error vanishes."""
    net = _net().eval()
    x = torch.randn(20_000, 3, 1, 1)
    with torch.no_grad():  # make the BN statistics the true ones of this data
        pre = net[0](x)
        net[1].running_mean.copy_(pre.mean((0, 2, 3)))
        net[1].running_var.copy_(pre.var((0, 2, 3)))
        net[1].weight.copy_(torch.rand(16) + 0.5)
        net[1].bias.copy_(torch.randn(16))
    folded = fold_batchnorm(trace(net))
    moments = propagate(
        folded.gm,
        folded.stats,
        Moments(*(torch.zeros(3), torch.ones(3), -4 * torch.ones(3), 4 * torch.ones(3))),
    )
    q = quantize_weights(folded.gm, folded.stats, QuantConfig(bits_weight=4))
    fixed = correct_bias(q.gm, folded.gm, folded.stats, moments)
    with torch.no_grad():
        ref = folded.gm(x)
        err_before = (q.gm(x) - ref).mean((0, 2, 3)).abs().max()
        err_after = (fixed.gm(x) - ref).mean((0, 2, 3)).abs().max()
    assert err_before > 0.02
    assert err_after < err_before / 5


def test_expected_input_of_second_layer_is_the_relu_mean():
    net = randomize_bn(_net())
    folded = fold_batchnorm(trace(net))
    inputs = Moments(torch.zeros(3), torch.ones(3), -torch.ones(3), torch.ones(3))
    moments = propagate(folded.gm, folded.stats, inputs)
    relu_node = [n for n in folded.gm.graph.nodes if n.target == "2"][0]
    st = folded.stats["0"]
    expected, _ = clipped_normal_moments(st.mean, st.std, 0.0, math.inf)
    assert torch.allclose(moments[relu_node.name].mean, expected)
    assert (moments[relu_node.name].lo >= 0).all()


def test_config_rejects_absorption_without_equalize():
    from dfq import DfqError

    with pytest.raises(DfqError, match="`absorption` needs `equalize`"):
        PipelineConfig(absorption=True)
