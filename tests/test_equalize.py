"""Cross-layer equalization and high-bias absorption: invariance, equal ranges, convergence."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import CatNet, SmallNet, randomize_bn
from torch import nn

from dfq import absorb_high_bias, equalize, find_pairs, fold_batchnorm, replace_relu6, trace
from dfq.transforms.equalize import equalization_scales, input_ranges, output_ranges


def _prepared(model, relu=True):
    t = fold_batchnorm(trace(model))
    return replace_relu6(t.gm, t.stats) if relu else t


def test_equalize_small_net_invariant_float64(small_net):
    t = _prepared(small_net.double())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    eq = equalize(t.gm, t.stats)
    assert (eq.gm(x) - t.gm(x)).abs().max() <= 1e-6
    assert eq.info["dw.0"].equalized_with == "pw.0"
    assert "residual add" in eq.info["stem.0"].equalize_note


def test_equalize_mobilenet_v2_invariant_and_balanced():
    m = randomize_bn(torchvision.models.mobilenet_v2(), seed=2).double()
    t = _prepared(m)
    eq = equalize(t.gm, t.stats)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert (eq.gm(x) - t.gm(x)).abs().max() <= 1e-6
    pairs, skipped = find_pairs(eq.gm)
    assert len(pairs) == 37  # 17 blocks: conv->dw and dw->conv, less the residual outputs
    for p in pairs:
        r1 = output_ranges(eq.gm.get_submodule(p.first))
        r2 = input_ranges(eq.gm.get_submodule(p.second), r1.numel())
        assert torch.allclose(r1, r2, rtol=2e-2), p
    assert all("residual add" in why or "network output" in why for why in skipped.values())


def test_second_pass_changes_almost_nothing(small_net):
    t = _prepared(small_net)
    once = equalize(t.gm, t.stats)
    twice = equalize(once.gm, once.stats)
    for name, p in once.gm.named_parameters():
        assert torch.allclose(p, dict(twice.gm.named_parameters())[name], rtol=1e-2, atol=1e-6)


def test_equalized_stats_follow_the_scales(small_net):
    t = _prepared(small_net)
    eq = equalize(t.gm, t.stats)
    x = torch.randn(256, 3, 8, 8)
    # the stem's pre-activation mean per channel scales exactly as its bias does
    ratio_stats = eq.stats["stem.0"].mean / t.stats["stem.0"].mean
    ratio_bias = eq.gm.get_submodule("stem.0").bias / t.gm.get_submodule("stem.0").bias
    assert torch.allclose(ratio_stats, ratio_bias, rtol=1e-4)
    assert x is not None


def test_zero_channel_gives_no_nan():
    m = randomize_bn(SmallNet())
    with torch.no_grad():
        m.stem[0].weight[3] = 0
        m.pw[0].weight[:, 5] = 0
    t = _prepared(m)
    eq = equalize(t.gm, t.stats)
    assert all(torch.isfinite(p).all() for p in eq.gm.parameters())
    assert all(
        torch.isfinite(s.mean).all() and torch.isfinite(s.std).all() for s in eq.stats.values()
    )
    assert torch.equal(
        equalization_scales(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])), torch.ones(2)
    )


def test_relu6_kept_is_equalized_exactly_float64(small_net):
    """ReLU6(x/s)*s = min(ReLU(x), 6/s)*s: per-channel bounds keep the float function."""
    from dfq.graph.modules import ChannelMin

    t = _prepared(small_net.double(), relu=False)
    eq = equalize(t.gm, t.stats)
    assert eq.info["dw.0"].equalized_with == "pw.0" and "ReLU6 kept" in eq.info["dw.0"].kept_clip
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 3
    assert (eq.gm(x) - t.gm(x)).abs().max() <= 1e-9
    clip = [m for m in eq.gm.modules() if isinstance(m, ChannelMin)][0]
    scales = torch.tensor(eq.info["dw.0"].scale_min), torch.tensor(eq.info["dw.0"].scale_max)
    assert clip.hi.min() >= 6 / scales[1] - 1e-6 and clip.hi.max() <= 6 / scales[0] + 1e-6


def test_mobilenet_v2_relu6_kept_invariant_float64():
    m = randomize_bn(torchvision.models.mobilenet_v2(), seed=4).double()
    t = _prepared(m, relu=False)
    eq = equalize(t.gm, t.stats)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64) * 2
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    assert sum(1 for v in eq.info.values() if v.equalized) == 37


def test_equalize_through_flatten_into_linear_float64():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
    )
    net = randomize_bn(net).double()
    t = _prepared(net)
    eq = equalize(t.gm, t.stats)
    assert eq.info["0"].equalized_with == "5"
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    assert (eq.gm(x) - t.gm(x)).abs().max() <= 1e-6


def test_absorption_keeps_output_when_shift_never_clips():
    """With no padding after, and inputs whose pre-activations stay above c, absorption is exact."""
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    randomize_bn(net)
    with torch.no_grad():
        net[1].bias.fill_(5.0)
        net[1].weight.fill_(0.5)
    t = _prepared(net.double())
    ab = absorb_high_bias(t.gm, t.stats, n_std=3.0)  # the paper's c = mean - 3 std
    assert ab.info["0"].absorbed_channels == 6
    assert torch.allclose(ab.stats["0"].mean, torch.full((6,), 1.5, dtype=torch.float64))
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 0.01
    assert (ab.gm(x) - t.gm(x)).abs().max() <= 1e-9
    # dfq's default keeps 6 std below the mean: c = 5 - 6 * 0.5 = 2
    ab6 = absorb_high_bias(t.gm, t.stats)
    assert torch.allclose(ab6.stats["0"].mean, torch.full((6,), 3.0, dtype=torch.float64))


def test_activation_aware_equalization_is_float_exact_and_balances_joint_ranges():
    """Balancing BN-derived activation ranges too: still the same float function, and at the
    fixed point each channel's worse of (weight, activation) range, relative to its tensor's
    maximum, equals the next layer's relative input range."""
    from dfq import EqualizeConfig
    from dfq.graph.modules import ChannelMin
    from dfq.transforms.equalize import _joint_ranges

    m = randomize_bn(torchvision.models.mobilenet_v2(), seed=5).double()
    t = _prepared(m, relu=False)
    aware = equalize(t.gm, t.stats, EqualizeConfig(activation_aware=True))
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert (aware.gm(x) - m(x)).abs().max() <= 1e-6
    first, second = (
        aware.gm.get_submodule("features.0.0"),
        aware.gm.get_submodule("features.1.conv.0.0"),
    )
    clip = aware.gm.get_submodule("features_0_2_clip")
    assert isinstance(clip, ChannelMin)
    r1 = output_ranges(first)
    j1, j2 = _joint_ranges(
        r1, input_ranges(second, r1.numel()), aware.stats["features.0.0"], [clip], 6.0
    )
    assert torch.allclose(j1, j2, rtol=0.05)


def test_residual_regions_equalize_mobilenet_resnet_and_regnet_exactly():
    """Around residual adds all producers share one scale vector and every consumer takes the
    inverse: float64 unchanged, and only the classifiers are left unequalized (RegNetX: its
    1x1 -> grouped 3x3 -> 1x1 blocks too)."""
    from dfq import EqualizeConfig
    from dfq.graph.regions import find_regions
    from dfq.transforms.equalize import _region_ranges

    torch.manual_seed(0)  # the conv weights: region and pair sweeps meet within ~4 % on these
    for net, n_regions in (
        (torchvision.models.mobilenet_v2(), 5),
        (torchvision.models.resnet18(), 4),
        (torchvision.models.regnet_x_400mf(), 5),
    ):
        m = randomize_bn(net.eval(), seed=6).double()
        t = _prepared(m, relu=False)
        eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
        x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
        assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
        regions, skipped = find_regions(eq.gm)
        assert len(regions) == n_regions and not skipped
        left = [k for k, v in eq.info.items() if v.is_set("equalize_note")]
        assert left == [next(k for k in eq.info if k in ("classifier.1", "fc"))]
        for r in regions:  # the largest producer and consumer ranges now match per channel
            r1, r2 = _region_ranges(eq.gm, r)
            assert torch.allclose(r1, r2, rtol=0.05)


def test_region_through_channel_padding_is_exact():
    """ResNet "option A" shortcuts subsample and zero-pad channels: the padded stream sits at a
    channel offset in the next stage's region, so each stage's stream joins the next one."""
    from dfq import EqualizeConfig
    from dfq.graph.regions import find_regions
    from dfq.models import build

    m = randomize_bn(build("cifar_resnet20"), seed=2).double().eval()
    t = _prepared(m, relu=False)
    regions, skipped = find_regions(t.gm)
    assert not skipped and len(regions) == 1 and regions[0].channels == 64
    eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    assert [k for k, v in eq.info.items() if v.is_set("equalize_note")] == ["linear"]


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_concatenation_regions_are_channel_sliced_and_exact(act):
    """All inputs of a concatenation share one scale vector, each producer takes its slice and
    the consumer the inverse; the stem's fan-out to three branches is a region too. ReLU6 inside
    a region becomes ReLU + per-channel bounds that follow their channels' scales."""
    from dfq import EqualizeConfig
    from dfq.graph.regions import find_regions
    from dfq.transforms.equalize import _region_ranges

    torch.manual_seed(0)
    m = randomize_bn(CatNet(act), seed=3).double().eval()
    with torch.no_grad():
        m.a[0].weight.mul_(
            torch.linspace(0.01, 10, 6, dtype=torch.float64).reshape(-1, 1, 1, 1)
        )  # wide spread
    t = _prepared(m, relu=False)
    regions, skipped = find_regions(t.gm)
    assert not skipped
    by_consumer = {r.consumers[0][0]: r for r in regions}
    cat = by_consumer["fuse.0"]
    assert cat.kind == "concatenation" and cat.channels == 20
    assert sorted(cat.producers) == [("a.0", 0), ("b.0", 6), ("c.0", 16)]
    fan = next(r for r in regions if r.producers == (("stem.0", 0),))
    assert {c for c, *_ in fan.consumers} == {"a.0", "b.0", "c.0"}
    eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    r1, r2 = _region_ranges(eq.gm, cat)
    assert torch.allclose(r1, r2, rtol=0.05)
    before, after = (_region_ranges(g, cat)[0] for g in (t.gm, eq.gm))
    assert after.max() / after.median() < before.max() / before.median()
    assert eq.info["a.0"].equalized_region.startswith("concatenation region")
    if act is nn.ReLU6:
        assert len(find_regions(eq.gm)[0][0].clips + find_regions(eq.gm)[0][1].clips) == 3
        assert not any(isinstance(mod, nn.ReLU6) for mod in eq.gm.modules())


def test_deeplab_concatenations_and_fan_outs_are_equalized():
    """DeepLab-v3+: ASPP's five branches and the decoder's two inputs are concatenation regions;
    only the logits layer stays unequalized, and the float model is unchanged."""
    from dfq import EqualizeConfig
    from dfq.models import build

    m = randomize_bn(build("deeplabv3plus_mobilenetv2"), seed=1).double().eval()
    t = _prepared(m, relu=False)
    eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
    x = torch.randn(1, 3, 65, 65, dtype=torch.float64)
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    left = [k for k, v in eq.info.items() if v.is_set("equalize_note")]
    assert left == ["decoder.last_conv.6"]
    cats = sorted(
        v.equalized_region
        for v in eq.info.values()
        if (v.equalized_region or "").startswith("concatenation")
    )
    assert (
        len(cats) == 7
        and any("5 producers" in c for c in cats)
        and any("2 producers" in c for c in cats)
    )


class _AddConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x) + 1.0)


def test_add_with_a_constant_is_no_region():
    """x / s + 1 != (x + 1) / s: a region must not reach through an add of a constant."""
    from dfq import EqualizeConfig

    torch.manual_seed(0)
    m = _AddConstant().double().eval()
    with torch.no_grad():
        m.a.weight.mul_(torch.tensor([0.01, 1, 10, 100], dtype=torch.float64).reshape(-1, 1, 1, 1))
    t = _prepared(m, relu=False)
    eq = equalize(t.gm, t.stats, EqualizeConfig(residual_regions=True))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    assert "add with a constant" in eq.info["add"].equalize_note


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(8, 6, 3),
        nn.Conv2d(8, 12, 3, groups=4),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 16, 3, groups=8),
        nn.Conv2d(8, 4, 1, groups=2),
    ],
)
def test_input_scaling_is_a_scale_of_the_input_channels(layer):
    """scale_inputs_(m, s) computes m(x * s) for every kind of conv (dense, grouped, depthwise,
    depthwise multiplier), and input_ranges are the max |w| that each input channel meets."""
    from dfq.transforms.equalize import scale_inputs_

    layer = layer.double()
    s = torch.rand(8, dtype=torch.float64) + 0.5
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    ref = layer(x * s.reshape(1, -1, 1, 1))
    w = layer.weight.detach()
    per_group = w.shape[0] // layer.groups
    group_of, local = [c // w.shape[1] for c in range(8)], [c % w.shape[1] for c in range(8)]
    expected = torch.stack(
        [w[g * per_group : (g + 1) * per_group, c].abs().max() for g, c in zip(group_of, local)]
    )
    assert torch.equal(input_ranges(layer, 8), expected)
    scale_inputs_(layer, s)
    assert torch.allclose(layer(x), ref, atol=1e-12)


class ResNeXtBlock(nn.Module):
    """1x1 -> grouped 3x3 (32 groups of 4 channels in resnext50; here 4 of 4) -> 1x1, + input."""

    def __init__(self, c: int = 8, width: int = 16, groups: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, groups=groups),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, c, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return F.relu(x + self.body(x))


def test_grouped_convs_are_equalized_exactly_and_balanced():
    torch.manual_seed(0)
    m = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            ResNeXtBlock(),
            nn.Conv2d(8, 16, 3, groups=8),
            nn.BatchNorm2d(16),
            nn.ReLU6(),  # dw multiplier
            nn.Conv2d(16, 4, 1),
        ),
        seed=5,
    ).double()
    t = _prepared(m, relu=False)
    eq = equalize(t.gm, t.stats)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    assert (eq.gm(x) - m(x)).abs().max() <= 1e-6
    pairs, _ = find_pairs(eq.gm)
    assert {(p.first, p.second) for p in pairs} == {
        ("3.body.0", "3.body.3"),
        ("3.body.3", "3.body.6"),
        ("4", "7"),
    }
    for p in pairs:
        r1 = output_ranges(eq.gm.get_submodule(p.first))
        r2 = input_ranges(eq.gm.get_submodule(p.second), r1.numel())
        assert torch.allclose(r1, r2, rtol=2e-2), p


def _near_dead_net(dead: bool) -> nn.Module:
    """conv-BN-ReLU6 x2 then a conv; `dead`: channels 0..2 of the first BN have gamma 1e-6
    (their output is the constant beta) and channel 3 a dead input (zero filter, running variance
    far below eps, as after TF's dead ReLU6 channels: its output is beta too)."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, eps=1e-3),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 4, 1),
    )
    for bn in (m[1], m[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-0.5, 1)
    if dead:
        m[1].weight.data[:3] = 1e-6
        m[1].bias.data[:4] = torch.tensor([0.5, 2.0, 5.0, 1.5])
        m[0].weight.data[3] = 0.0
        m[1].running_mean[3], m[1].running_var[3] = 0.0, 1e-15
    return m.eval()


def test_near_dead_channels_neither_blow_up_ranges_nor_outputs():
    """Equalization divides a near-dead channel by a tiny scale (its bias grows ~1e4x); its
    BN-derived std is ~0, so high-bias absorption moves that constant into the next layer and
    the activation range stays that of the live channels."""
    from dfq import PipelineConfig, quantize_model

    x = torch.randn(32, 3, 8, 8)
    errors, ranges = {}, {}
    for dead in (False, True):
        m = _near_dead_net(dead)
        r = quantize_model(m, PipelineConfig(equalize=True, correction=True))
        ranges[dead] = max(
            v.activation_range[1] for k, v in r.activations.items() if k != "input_1"
        )
        with torch.no_grad():
            errors[dead] = float((r.model(x) - m(x)).pow(2).mean() / m(x).pow(2).mean())
        if dead:
            assert r.layers["0"].absorbed_max > 100  # the blown-up constants went to the next layer
    assert ranges[True] <= 2 * ranges[False] + 6
    assert errors[True] <= 3 * errors[False] + 1e-4
    # exact in float64: equalization and absorption of constant channels change nothing
    m = _near_dead_net(True).double()
    t = _prepared(m, relu=False)
    eq = equalize(t.gm, t.stats)
    absorbed = absorb_high_bias(eq.gm, eq.stats).gm
    x = x.double()
    assert float((absorbed(x) - m(x)).abs().max()) <= 1e-6
