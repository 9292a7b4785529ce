"""Ops that are the identity in eval mode (stochastic depth, drop path, dropout variants) are
pass-through: equalization regions and pairs look through them, moments flow through them, and
they need no requantization."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torchvision.ops import StochasticDepth, stochastic_depth

from conftest import randomize_bn
from dfq import EqualizeConfig, PipelineConfig, equalize, fold_batchnorm, quantize_model, trace
from dfq.graph.regions import find_regions
from dfq.transforms.equalize import _region_ranges


def drop_path(x, drop_prob: float = 0.0, training: bool = False):
    """timm's drop_path, kept as one call in the graph (fx.wrap), as a leaf would leave it."""
    if drop_prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - drop_prob)
    return x * keep / (1 - drop_prob)


fx.wrap("drop_path")

DROPS = {
    "StochasticDepth": lambda: StochasticDepth(0.2, "row"),
    "stochastic_depth": lambda: Call(lambda x, training: stochastic_depth(x, 0.2, "row", training)),
    "drop_path": lambda: Call(lambda x, training: drop_path(x, 0.2, training)),
    "Dropout2d": lambda: nn.Dropout2d(0.2),
    "alpha_dropout": lambda: Call(lambda x, training: F.alpha_dropout(x, 0.2, training)),
}


class Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.training)


class Block(nn.Module):
    """x + drop(conv-BN(ReLU(conv-BN(x)))): the tail of torchvision's MBConv / ResNet blocks."""

    def __init__(self, c: int, drop: nn.Module):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 2 * c, 1), nn.BatchNorm2d(2 * c), nn.ReLU(),
                                  nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.drop = drop

    def forward(self, x):
        return x + self.drop(self.body(x))


def net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), Block(6, DROPS[kind]()),
                                      Block(6, DROPS[kind]()), nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)), seed=4)


@pytest.mark.parametrize("kind", list(DROPS))
def test_residual_region_through_stochastic_depth_is_equalized_exactly(kind):
    m = net(kind).double()
    t = fold_batchnorm(trace(m))
    eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    regions, skipped = find_regions(eq.gm)
    assert len(regions) == 1 and not skipped
    assert sorted(p for p, _ in regions[0].producers) == ["0", "2.body.3", "3.body.3"]
    r1, r2 = _region_ranges(eq.gm, regions[0])
    assert torch.allclose(r1, r2, rtol=0.05)


@pytest.mark.parametrize("kind", list(DROPS))
def test_identities_get_moments_and_no_quantizer(kind):
    res = quantize_model(net(kind), PipelineConfig(equalize=True, correction=True))
    assert all(a["activation_range"] is not None for a in res.activations.values())
    assert not any("skipped" in n.get("bias_correction", "") for n in res.layers.values())
    # input, stem, per block: ReLU, conv, add; the head's conv and pool; none after a drop
    assert len(res.activations) == 10


def test_stochastic_depth_in_training_mode_is_no_identity():
    class Train(nn.Module):
        def forward(self, x):
            return stochastic_depth(x, 0.5, "row", True) + F.dropout(x, 0.5)  # F.dropout: training=True

    from dfq.graph.ops import is_pass_through

    gm = fx.symbolic_trace(Train())
    assert not any(is_pass_through(gm, n) for n in gm.graph.nodes)
