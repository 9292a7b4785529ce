"""BN folding: float64 invariance, the torch oracle, and the statistics it leaves behind."""
import torch
import torchvision
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from conftest import SmallNet, randomize_bn
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
    assert "input is not a conv/linear" in out.info["bn"]["note"]
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
    assert "other users" in out.info["bn"]["note"]
    x = torch.randn(1, 3, 4, 4)
    assert torch.allclose(out.gm(x), m(x), atol=1e-6)


def test_small_net_class_is_traceable():
    assert trace(SmallNet()).graph is not None
