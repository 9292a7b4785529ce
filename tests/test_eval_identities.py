"""Ops that are the identity in eval mode (stochastic depth, drop path, dropout variants) are
pass-through: equalization regions and pairs look through them, moments flow through them, and
they need no requantization."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from strategies import DROPS as STRATEGY_DROPS
from strategies import Drop
from torch import fx, nn
from torchvision.ops import stochastic_depth

from dfq import EqualizeConfig, PipelineConfig, equalize, fold_batchnorm, quantize_model, trace
from dfq.graph.ops import is_eval_identity, is_pass_through
from dfq.graph.regions import find_regions
from dfq.transforms.equalize import _region_ranges


class AlphaDropout(nn.Module):
    def forward(self, x):
        return F.alpha_dropout(x, 0.2, self.training)


# torchvision's StochasticDepth and stochastic_depth, timm's drop_path (one call in the graph), ...
DROPS = {
    **{kind: (lambda kind=kind: Drop(kind)) for kind in STRATEGY_DROPS},
    "alpha_dropout": AlphaDropout,
}


class Block(nn.Module):
    """x + drop(conv-BN(ReLU(conv-BN(x)))): the tail of torchvision's MBConv / ResNet blocks."""

    def __init__(self, c: int, drop: nn.Module):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, 2 * c, 1),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.Conv2d(2 * c, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )
        self.drop = drop

    def forward(self, x):
        return x + self.drop(self.body(x))


def net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            Block(6, DROPS[kind]()),
            Block(6, DROPS[kind]()),
            nn.Conv2d(6, 8, 1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        seed=4,
    )


@pytest.mark.parametrize("kind", list(DROPS))
def test_residual_region_through_stochastic_depth_is_equalized_exactly(kind):
    m = net(kind).double()
    t = fold_batchnorm(trace(m))
    assert sum(is_eval_identity(t.gm, n) for n in t.gm.graph.nodes) == 2  # not traced away
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
    assert all(a.activation_range is not None for a in res.activations.values())
    assert not any("skipped" in (n.bias_correction or "") for n in res.layers.values())
    # input, stem, per block: ReLU, conv, add; the head's conv and pool; none after a drop
    assert len(res.activations) == 10


@pytest.mark.parametrize(
    "fn,args,identity",
    [
        (stochastic_depth, (0.5, "row", False), True),
        (stochastic_depth, (0.5, "row", True), False),
        (F.dropout, (0.5, False), True),
        (F.dropout, (0.5,), False),  # F.dropout's training defaults to True
        (F.dropout2d, (), False),
        (F.alpha_dropout, (), True),
    ],
)
def test_a_functional_drop_is_the_identity_only_outside_training(fn, args, identity):
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    node = gm.graph.call_function(fn, (gm.graph.placeholder("x"), *args))
    assert is_eval_identity(gm, node) is identity and is_pass_through(gm, node) is identity
