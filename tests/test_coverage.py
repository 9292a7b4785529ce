"""Coverage: every BN, conv/linear and activation quantizer is counted, and each one the pipeline
left out is named with its reason; --strict turns any gap into a DfqError."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SmallNet, randomize_bn, shared
from torch import nn

from dfq import DfqError, PipelineConfig, quantize_model
from dfq.cli import main
from dfq.reporting.coverage import summary


class Gappy(nn.Module):
    """A functional conv whose weight depends on the input (not liftable), a BN after an add
    (not foldable) and a Conv1d: three kinds of gap."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.bn = nn.BatchNorm2d(8)
        self.seq = nn.Conv1d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn(x + F.conv2d(x, self.w * x.mean()))
        z = self.seq(y.flatten(2))
        return self.fc(z.mean(2))


def test_full_coverage_on_a_plain_cnn(small_net):
    r = quantize_model(small_net, PipelineConfig(equalize=True, strict=True))
    c = r.coverage
    assert (c["bn_folded"], c["bn_total"]) == (4, 4)
    assert (c["layers_quantized"], c["layers_total"]) == (5, 5)
    assert c["activations_ranged"] == c["activation_quantizers_total"] > 0
    assert c["layers_equalized"] < c["layers_total"]  # fc is a network output
    assert set(c["gaps"]) == {"equalized"} and "network output" in c["gaps"]["equalized"]["fc"]
    assert summary(c).startswith("coverage: BN folded 4/4, layers quantized 5/5")


def test_gaps_are_named_with_reasons():
    model = randomize_bn(Gappy())
    c = quantize_model(model, PipelineConfig()).coverage
    assert (c["bn_folded"], c["bn_total"]) == (1, 2)
    assert "input is not a conv/linear" in c["gaps"]["bn"]["bn"]
    assert (c["layers_quantized"], c["layers_total"]) == (2, 4)
    assert "conv2d call" in c["gaps"]["quantized"]["conv2d"]
    assert "Conv1d is not supported" in c["gaps"]["quantized"]["seq"]
    # fc reads the mean of the Conv1d's output, whose moments are unknown: float, and said so
    assert "--distill_range" in c["gaps"]["ranged"]["mean_1"]
    assert c["activations_ranged"] < c["activation_quantizers_total"]
    assert c["gaps"]["equalized"]["stem.0"] == "equalization off (--equalize)"


def test_strict_refuses_gaps_naming_the_nodes():
    with pytest.raises(DfqError) as e:
        quantize_model(randomize_bn(Gappy()), PipelineConfig(strict=True))
    msg = str(e.value)
    assert "bn_folded 1/2" in msg and "conv2d" in msg and "seq" in msg and "Fix:" in msg


def test_float_run_counts_folding_only(small_net):
    c = quantize_model(small_net, PipelineConfig(quantize=False, strict=True)).coverage
    assert c["bn_folded"] == 4 and c["layers_quantized"] is None and c["activations_ranged"] is None


def test_cli_prints_coverage_writes_it_and_strict_exits_2(tmp_path, capsys):
    src = tmp_path / "nets.py"
    src.write_text(
        "import torch\nfrom torch import nn\nimport torch.nn.functional as F\n"
        "class G(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = nn.Conv2d(3, 4, 3)\n"
        "        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))\n"
        "        self.fc = nn.Linear(4, 10)\n"
        "    def forward(self, x):\n"
        "        y = torch.relu(self.c(x))\n"
        "        return self.fc(F.conv2d(y, self.w * y.mean()).mean((2, 3)))\n"
        "def good():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n"
        "def gappy():\n"
        "    return G()\n"
    )
    data = str(shared("cifar10_foolbox20.npz"))
    common = [
        "--data",
        data,
        "--resize",
        "0",
        "--crop",
        "0",
        "--quantize",
        "--quiet",
        "--limit",
        "4",
    ]
    out_json = tmp_path / "r.json"
    assert (
        main(["cls", "--model", f"{src}:good", *common, "--strict", "--json", str(out_json)]) == 0
    )
    out = capsys.readouterr().out
    assert "coverage: BN folded 1/1, layers quantized 2/2" in out
    cov = json.loads(out_json.read_text())["coverage"]
    assert cov["activations_ranged"] == cov["activation_quantizers_total"]
    assert main(["cls", "--model", f"{src}:gappy", *common, "--strict"]) == 2
    err = capsys.readouterr().err
    assert "--strict" in err and "conv2d" in err and len(err.strip().splitlines()) == 1


def test_mobilenet_v2_is_fully_covered():
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.mobilenet_v2())
    c = quantize_model(model, PipelineConfig(relu=True, equalize=True, strict=True)).coverage
    assert (c["bn_folded"], c["bn_total"]) == (52, 52)
    assert (c["layers_quantized"], c["layers_total"]) == (53, 53)
    assert c["activations_ranged"] == c["activation_quantizers_total"] == 64
    assert c["layers_equalized"] == 37


def test_small_net_layers_match_weighted_modules():
    model = randomize_bn(SmallNet())
    r = quantize_model(model, PipelineConfig())
    assert r.coverage["layers_total"] == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()
    )


class Functional(nn.Module):
    """timm-style layers traced through: a weight-standardized conv (F.batch_norm over the
    weight, then F.conv2d), a Linear wrapper calling F.linear, a scaled residual and a
    squeeze-excitation mean over (2, 3)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.ws_weight = nn.Parameter(torch.randn(8, 8, 3, 3))
        self.gain = nn.Parameter(torch.rand(8) + 0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        w = F.batch_norm(
            self.ws_weight.reshape(1, 8, -1),
            None,
            None,
            self.gain,
            training=True,
            momentum=0.0,
            eps=1e-6,
        ).reshape_as(self.ws_weight)
        y = F.silu(F.conv2d(x, w, None, 1, 1))
        y = x + 0.2 * y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        return F.linear(y.mean((2, 3)), self.fc.weight, self.fc.bias)


def test_functional_layers_on_constant_weights_are_lifted_and_covered():
    torch.manual_seed(0)
    model = randomize_bn(Functional()).double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = quantize_model(model, PipelineConfig(quantize=False, equalize=True))
    with torch.no_grad():
        assert (r.model(x) - model(x)).abs().max() < 1e-12  # lifting keeps the function
    assert "conv2d call" in r.layers["conv2d_lifted"].lifted
    assert r.layers["fc"].lifted.startswith("linear call")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched
    c = quantize_model(copy.deepcopy(model).float(), PipelineConfig(strict=True)).coverage
    assert c["layers_quantized"] == c["layers_total"] == 3
    assert c["activations_ranged"] == c["activation_quantizers_total"]  # mean, 0.2 * y ranged
    assert c["tracer"] == "torch.fx.symbolic_trace"
