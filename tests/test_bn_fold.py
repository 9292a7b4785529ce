"""BN folding: float64 invariance, the torch oracle, and the statistics it leaves behind."""

import torch
import torch.nn.functional as F
import torchvision
from conftest import SmallNet, randomize_bn
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dfq import fold_batchnorm, trace


def test_fold_leaves_output_unchanged_float64(small_net):
    m = small_net.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = fold_batchnorm(trace(m))
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in out.gm.modules())
    assert torch.allclose(out.gm(x), m(x), atol=1e-9, rtol=0)


def test_fold_mobilenet_v2_float64():
    m = randomize_bn(torchvision.models.mobilenet_v2(), seed=1).double()
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    out = fold_batchnorm(trace(m))
    assert len(out.stats) == 52
    assert (out.gm(x) - m(x)).abs().max() <= 1e-6


def test_fold_matches_torch_oracle(small_net):
    conv, bn = small_net.stem[0], small_net.stem[1]
    ref = fuse_conv_bn_eval(conv, bn)
    out = fold_batchnorm(trace(small_net))
    folded = out.gm.get_submodule("stem.0")
    assert torch.allclose(folded.weight, ref.weight, atol=1e-6)
    assert torch.allclose(folded.bias, ref.bias, atol=1e-6)


def test_stats_are_the_bn_output_distribution(small_net):
    """N(beta, gamma^2 v / (v + eps)): BN's output when its input has the running moments."""
    bn = small_net.dw[1]
    with torch.no_grad():
        bn.weight[0] = -0.7
        bn.running_var[1] = 0.0  # a dead channel: BN outputs beta alone
    st = fold_batchnorm(trace(small_net)).stats["dw.0"]
    assert torch.equal(st.mean, bn.bias.detach())
    v = bn.running_var
    torch.testing.assert_close(st.std, bn.weight.detach().abs() * torch.sqrt(v / (v + bn.eps)))
    assert st.std[1] == 0 and st.std[0] > 0.69
    noise = torch.randn(4096, 8, 1, 1, generator=torch.Generator().manual_seed(0))
    x = noise * v.sqrt()[:, None, None] + bn.running_mean[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(bn.eval()(x).std((0, 2, 3)), st.std, rtol=0.05, atol=1e-6)


def test_bn_after_add_is_left_and_reported():
    class AddBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x) + self.b(x))

    m = randomize_bn(AddBN())
    out = fold_batchnorm(trace(m))
    assert "input is not a conv/linear" in out.info["bn"].note
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(out.gm(x), m(x), atol=1e-6)


def test_user_model_unchanged(small_net):
    before = {k: v.clone() for k, v in small_net.state_dict().items()}
    fold_batchnorm(trace(small_net))
    after = small_net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(small_net.stem[1], nn.BatchNorm2d)


def test_conv_bn_with_two_users_is_not_folded():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    m = randomize_bn(Fork())
    out = fold_batchnorm(trace(m))
    assert "other users" in out.info["bn"].note
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(out.gm(x), m(x), atol=1e-6)


def test_small_net_class_is_traceable():
    assert trace(SmallNet()).graph is not None


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d (timm/layers/norm_act.py) in eval: a BatchNorm2d subclass (so that
    checkpoints load) whose forward asserts a 4-D input, calls F.batch_norm on the running
    statistics, then drop and act. Not a torch.nn class, so fx traces through it: get_attr nodes,
    a call_function batch_norm, and shape reads of the conv output for the assert."""

    def __init__(self, n: int, act=nn.SiLU):
        super().__init__(n)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(self.drop(x))


def _timm_like(bn=BatchNormAct2d):
    torch.manual_seed(0)
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            bn(6),
            nn.Conv2d(6, 6, 3, padding=1, groups=6),
            bn(6, nn.ReLU),
            nn.Conv2d(6, 4, 1),
            bn(4, nn.Identity),
        ),
        seed=3,
    )


def test_functional_batchnorm_folds_like_the_module_float64():
    m = _timm_like().double()
    gm = trace(m)
    assert (
        sum(n.target is F.batch_norm for n in gm.graph.nodes) == 3
    )  # fx traced through the subclass
    out = fold_batchnorm(gm)
    assert not any(n.target is F.batch_norm or n.op == "get_attr" for n in out.gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert (out.gm(x) - m(x)).abs().max() <= 1e-6
    assert out.info["0"].to_dict() == {"bn_folded": "1"}
    assert out.info["4"].to_dict() == {"bn_folded": "5"}
    # the same weights and statistics as folding the plain modules
    plain = _timm_like(lambda n, act=nn.SiLU: nn.BatchNorm2d(n)).double()
    ref = fold_batchnorm(trace(plain))
    for name in ("0", "2", "4"):
        assert torch.equal(out.gm.get_submodule(name).weight, ref.gm.get_submodule(name).weight)
        assert torch.equal(out.stats[name].mean, ref.stats[name].mean)
        assert torch.equal(out.stats[name].std, ref.stats[name].std)


def test_functional_batchnorm_not_foldable_is_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

        def forward(self, x):
            a, b = self.bn1, self.bn2
            y = F.batch_norm(
                self.conv(x) + 1, a.running_mean, a.running_var, a.weight, a.bias, False, 0.1, 1e-5
            )
            return y + F.batch_norm(self.conv(x), b.running_mean, b.running_var, training=True)

    m = randomize_bn(Odd())
    out = fold_batchnorm(trace(m))
    assert "input is not a conv/linear" in out.info["bn1"].note
    assert "training mode" in out.info["bn2"].note
    assert sum(n.target is F.batch_norm for n in out.gm.graph.nodes) == 2


def test_pipeline_on_timm_like_blocks_folds_every_bn_and_ranges_every_quantizer():
    from dfq import PipelineConfig, quantize_model

    res = quantize_model(_timm_like(), PipelineConfig(equalize=True, correction=True))
    assert [res.layers[n].bn_folded for n in ("0", "2", "4")] == ["1", "3", "5"]
    assert res.layers["2"].equalized_with == "4"  # the assert's shape reads are no second user
    assert all(a.activation_range is not None for a in res.activations.values())


class MixedConv(nn.Module):
    """MixNet's mixed depthwise conv: split -> convs of different kernels -> cat -> BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.k3 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.k5 = nn.Conv2d(4, 6, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):
        a, b = torch.split(self.stem(x), [4, 4], dim=1)
        y = torch.relu(self.bn(torch.cat([self.k3(a), self.k5(b)], 1)))
        return self.fc(y.mean((2, 3)))


def test_bn_after_a_concatenation_of_convs_folds_into_each_slice():
    from dfq import PipelineConfig, quantize_model

    model = randomize_bn(MixedConv()).double()
    t = fold_batchnorm(trace(model))
    assert t.info["k3"].bn_folded == t.info["k5"].bn_folded == "bn"
    assert torch.allclose(t.stats["k5"].mean, model.bn.bias.detach()[4:].to(t.stats["k5"].mean))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert (t.gm(x) - model(x)).abs().max() < 1e-12
    c = quantize_model(model.float(), PipelineConfig(strict=True)).coverage
    assert (c["bn_folded"], c["bn_total"]) == (2, 2)
