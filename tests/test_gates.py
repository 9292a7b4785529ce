"""Squeeze-excitation gates (x * sigmoid(fc(pool(x)))): data-free moments and ranges of the product.

The nets' BatchNorm statistics are made the true ones of the test data (one forward pass in
training mode with a cumulative average), so BN-based ranges must hold what the data does."""

import pytest
import torch
from conftest import randomize_bn
from torch import fx, nn

from dfq import PipelineConfig, fold_batchnorm, propagate, quantize_model, trace
from dfq.graph.ops import is_mul
from dfq.quant.activations import quantizer_nodes
from dfq.statistics.moments import Moments, _product, input_moments


class SE(nn.Module):
    """torchvision's SqueezeExcitation (gate first) or timm's SqueezeExcite (input first)."""

    def __init__(self, c: int, gate: type[nn.Module], gate_first: bool):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2, self.gate = (
            nn.Conv2d(c, 4, 1),
            nn.SiLU(),
            nn.Conv2d(4, c, 1),
            gate(),
        )
        self.gate_first = gate_first

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return s * x if self.gate_first else x * s


def se_net(gate=nn.Sigmoid, gate_first=True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        SE(8, gate, gate_first),
        nn.Conv2d(8, 6, 1),
        nn.BatchNorm2d(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def images(n=64, hw=12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (torch.rand(n, 3, hw, hw, generator=g) - mean[:, None, None]) / std[:, None, None]


def with_true_bn_stats(net: nn.Module, x: torch.Tensor) -> nn.Module:
    randomize_bn(net)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its own statistics
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def test_product_of_independent_factors():
    g = torch.Generator().manual_seed(0)
    a = Moments(
        torch.tensor([1.0, -0.5]),
        torch.tensor([0.25, 4.0]),
        torch.tensor([0.0, -6.5]),
        torch.tensor([2.0, 5.5]),
    )
    b = Moments(torch.tensor([0.3]), torch.tensor([0.01]), torch.tensor([0.0]), torch.tensor([1.0]))
    p = _product(a, b)
    xa = a.mean + a.var.sqrt() * torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    xb = b.mean + b.var.sqrt() * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    assert torch.allclose(p.mean.double(), (xa * xb).mean(0), atol=5e-3)
    assert torch.allclose(p.var.double(), (xa * xb).var(0), rtol=1e-2)
    assert p.lo.tolist() == [0.0, -6.5] and p.hi.tolist() == [2.0, 5.5]
    assert _product(a, Moments(*(torch.zeros(3),) * 4)) is None  # 2 channels times 3: not a gate


@pytest.mark.parametrize("gate,gate_first", [(nn.Sigmoid, True), (nn.Hardsigmoid, False)])
def test_gate_moments_and_every_range_hold_the_data(gate, gate_first):
    x = images()
    net = with_true_bn_stats(se_net(gate, gate_first), x)
    # 6-std ranges hold every value (the mse rule clips tails on purpose)
    res = quantize_model(net, PipelineConfig(correction=True, range_rule="std"))
    assert all(a.activation_range is not None for a in res.activations.values()), res.activations
    assert all("skipped" not in (n.bias_correction or "") for n in res.layers.values())
    # the ranges hold every value the data produces at each quantizer (nothing would be clipped)
    gm = res.model
    seen = {}
    hooks = [
        gm.get_submodule(q.target).register_forward_pre_hook(
            lambda mod, inp, src=src: seen.__setitem__(
                src, (float(inp[0].min()), float(inp[0].max()))
            )
        )
        for src, q in quantizer_nodes(gm).items()
    ]
    with torch.no_grad():
        gm(x)
    for h in hooks:
        h.remove()
    for src, (lo, hi) in seen.items():
        r_lo, r_hi = res.activations[src].activation_range
        assert r_lo - 1e-3 <= lo and hi <= r_hi + 1e-3, (src, (lo, hi), (r_lo, r_hi))


def node_value(gm, name: str, x: torch.Tensor) -> torch.Tensor:
    """The value of one node of `gm` on input x."""
    values = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Record(gm).run(x)
    return values[name]


def test_gate_and_gated_tensor_means_are_close_to_the_data():
    """Per-channel means on data that follows the BN statistics: the conservative pooled variance
    widens the gate's distribution (5-25x its std here), which moves E[sigmoid] towards 1/2 a
    little (< 0.01); the gated tensor's mean stays within a few % of its std."""
    x = images(256)
    folded = fold_batchnorm(trace(with_true_bn_stats(se_net(), x)))
    moments = propagate(
        folded.gm, folded.stats, input_moments((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    mul = next(n for n in folded.gm.graph.nodes if is_mul(n))
    gate = node_value(folded.gm, mul.args[0].name, x).mean((0, 2, 3))
    assert (moments[mul.args[0].name].mean - gate).abs().max() < 0.02
    y, m = node_value(folded.gm, mul.name, x), moments[mul.name]
    assert ((m.mean - y.mean((0, 2, 3))).abs() <= 0.05 * y.std((0, 2, 3))).all()
    assert (m.lo <= y.amin((0, 2, 3))).all() and (m.hi >= y.amax((0, 2, 3))).all()


def test_every_layer_reads_an_int8_input_after_smooth_activations_and_gates():
    """SiLU outputs, the gate and the gated product are quantization points, so no conv reads a
    float tensor; each gets a data-free range (strict coverage passes)."""
    net = with_true_bn_stats(se_net(), images())
    res = quantize_model(net, PipelineConfig(strict=True))
    points = quantizer_nodes(res.model)
    silus = [
        n.name
        for n in res.float_model.graph.nodes
        if n.op == "call_module" and isinstance(res.float_model.get_submodule(n.target), nn.SiLU)
    ]
    muls = [n.name for n in res.float_model.graph.nodes if is_mul(n)]
    assert len(silus) == 3 and len(muls) == 1 and set(silus + muls) <= set(points)
    assert res.coverage["activations_ranged"] == res.coverage["activation_quantizers_total"]


class Normed(nn.Module):
    """A layer norm (no data-free moments) between two convs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(nn.functional.layer_norm(y, y.shape[1:]))


def test_a_point_without_moments_stays_float_and_says_so_data_ranges_fill_it():
    net = Normed().eval()
    res = quantize_model(net, PipelineConfig())
    ln = next(n.name for n in res.float_model.graph.nodes if n.target is nn.functional.layer_norm)
    assert ln in quantizer_nodes(res.model)  # b's input is a quantization point...
    assert "--distill_range" in res.coverage["gaps"]["ranged"][ln]  # ...but without a range
    calib = [images(8, 10)]
    res = quantize_model(net, PipelineConfig(distill_range=True, strict=True), calib_data=calib)
    assert res.activations[ln].activation_range is not None


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return -0.5 * y.mean((2, 3), keepdim=True) + 1.0


def test_spatial_mean_and_scalar_affine_moments():
    folded = fold_batchnorm(trace(randomize_bn(Affine())))
    m = propagate(folded.gm, folded.stats, input_moments((0.5,) * 3, (0.25,) * 3), 6.0)
    names = [n.name for n in folded.gm.graph.nodes]
    conv, mean, mul, add = (m[k] for k in ("conv", "mean", "mul", "add"))
    assert "mean" in names and torch.equal(mean.mean, conv.mean)  # a global average pool
    assert torch.allclose(add.mean, -0.5 * conv.mean + 1) and torch.allclose(
        add.var, 0.25 * conv.var
    )
    assert torch.allclose(add.lo, -0.5 * conv.hi + 1) and torch.allclose(add.hi, -0.5 * conv.lo + 1)
    assert torch.allclose(mul.lo, -0.5 * conv.hi)


class DenseBlock(nn.Module):
    """DenseNet's pre-activation: BN-ReLU-conv after a concatenation (a BN that cannot fold)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.grow = nn.Conv2d(6, 4, 3, padding=1)
        self.norm, self.conv = nn.BatchNorm2d(10), nn.Conv2d(10, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.norm(torch.cat([x, self.grow(x)], 1)))
        return self.fc(self.conv(y).mean((2, 3)))


def test_an_unfolded_batchnorm_gives_moments_from_its_own_statistics():
    x = images()
    net = with_true_bn_stats(DenseBlock(), x)
    res = quantize_model(net, PipelineConfig())
    c = res.coverage
    assert c["bn_folded"] == 1 and "input is not a conv/linear" in c["gaps"]["bn"]["norm"]
    assert c["activations_ranged"] == c["activation_quantizers_total"]
    relu = next(n.name for n in res.float_model.graph.nodes if n.target is torch.relu)
    lo, hi = res.activations[relu].activation_range
    y = node_value(res.float_model, relu, x)
    # the BN's statistics give a range for (almost) all the data: its input is a concatenation of
    # rectified maps, not a normal, so the far tail may pass mean + 6 std
    assert lo == 0.0 and float((y > hi).float().mean()) < 1e-3 and hi < 2 * float(y.max())


def test_convnext_block_layer_norm_and_layer_scale_get_ranges_that_hold_the_data():
    """Channels-last ConvNeXt: permute, LayerNorm over the channels, Linear, GELU, Linear,
    permute back, a per-channel layer scale, the residual add: every point ranged, and the
    ranges hold nearly all the data."""
    from torchvision.models.convnext import CNBlock

    torch.manual_seed(0)
    block = CNBlock(8, layer_scale=1.0, stochastic_depth_prob=0.0)
    with torch.no_grad():
        block.layer_scale.uniform_(0.5, 1.5)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
    ).eval()
    res = quantize_model(net, PipelineConfig(strict=True))
    assert res.coverage["activations_ranged"] == res.coverage["activation_quantizers_total"] > 6
    x = images(32)
    for src, notes in res.activations.items():
        lo, hi = notes.activation_range
        y = node_value(res.float_model, src, x)
        outside = ((y < lo - 1e-3) | (y > hi + 1e-3)).float().mean()
        assert outside < 1e-3 and hi - lo < 10 * float(y.max() - y.min()), (src, lo, hi)


class SplitNet(nn.Module):
    """CSP/Res2Net torch.split, MixNet split -> convs -> cat, GhostNet x[:, :k]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(5, 6, 1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        p, q = torch.split(x, [3, 5], dim=1)
        y = torch.cat([self.a(p), self.b(q)], 1)[:, :12]
        h, k = y.chunk(2, 1)
        return self.fc(torch.cat([h, k], 1).mean((2, 3)))


def test_channel_splits_and_slices_carry_their_channels_moments():
    net = randomize_bn(SplitNet())
    folded = fold_batchnorm(trace(net))
    m = propagate(folded.gm, folded.stats, input_moments((0.5,) * 3, (0.25,) * 3))
    nodes = {n.name: n for n in folded.gm.graph.nodes}
    stem = m["stem_2"]
    assert torch.equal(m["getitem"].mean, stem.mean[:3]) and torch.equal(
        m["getitem_1"].hi, stem.hi[3:]
    )
    assert torch.equal(m["getitem_2"].mean, m["cat"].mean[:12])  # y = cat[:, :12]
    h = next(
        n
        for n in nodes.values()
        if n.op == "call_function" and n.args[0] is nodes["chunk"] and n.args[1] == 1
    )
    assert torch.equal(m[h.name].var, m["getitem_2"].var[6:])
    res = quantize_model(net, PipelineConfig(strict=True))
    assert res.coverage["activations_ranged"] == res.coverage["activation_quantizers_total"]


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12))
        self.conv = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        from torchvision.models.shufflenetv2 import channel_shuffle

        return self.conv(channel_shuffle(self.stem(x), 3))


def test_channel_shuffle_permutes_the_channels_moments():
    from torchvision.models.shufflenetv2 import channel_shuffle

    folded = fold_batchnorm(trace(randomize_bn(Shuffle())))
    m = propagate(folded.gm, folded.stats, input_moments((0.5,) * 3, (0.25,) * 3))
    conv = next(n for n in folded.gm.graph.nodes if n.target == "conv")
    want = channel_shuffle(m["stem_0"].mean.reshape(1, 12, 1, 1), 3).flatten()
    assert torch.equal(m[conv.args[0].name].mean, want)
