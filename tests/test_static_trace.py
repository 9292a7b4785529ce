"""When symbolic tracing fails on Python control flow over shapes, dfq traces with static shapes
(fx's meta tracer) and says so; a graph that bakes in more than the input size is refused."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from dfq import DfqError, PipelineConfig, quantize_model
from dfq.graph.trace import trace


class SamePad(nn.Module):
    """TF "same" padding computed in Python from the input's shape (as timm's Conv2dSame)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        pw = max((math.ceil(iw / 2) - 1) * 2 + 3 - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


class BakesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.shape[1] == 3:
            x = self.conv(x)
        return x.reshape(x.shape[0], -1)


def test_shape_control_flow_traces_with_static_shapes():
    torch.manual_seed(0)
    model = randomize_bn(SamePad()).double()
    gm = trace(model, (3, 12, 12))
    assert gm.meta["dfq_tracer"] == "torch.fx meta tracer, static input shape (1, 3, 12, 12)"
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    cfg = PipelineConfig(quantize=False, equalize=True, input_size=(3, 12, 12))
    with torch.no_grad():
        assert (quantize_model(model, cfg).model(x) - model(x)).abs().max() < 1e-12
    c = quantize_model(model.float(), PipelineConfig(strict=True, input_size=(3, 12, 12))).coverage
    assert c["tracer"].startswith("torch.fx meta tracer") and c["bn_folded"] == 2


def test_a_graph_that_bakes_in_the_batch_is_refused():
    with pytest.raises(DfqError, match="nor with static shapes") as e:
        trace(BakesBatch().eval(), (3, 8, 8))
    assert "Fix:" in str(e.value)


def test_cli_traces_for_the_images_it_evaluates(tmp_path, capsys):
    import json

    from conftest import shared

    from dfq.cli import main

    src = tmp_path / "net.py"
    src.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_static_trace import SamePad\n"
    )
    out = tmp_path / "r.json"
    code = main(
        [
            "cls",
            "--model",
            f"{src}:SamePad",
            "--data",
            str(shared("cifar10_foolbox20.npz")),
            "--resize",
            "0",
            "--crop",
            "0",
            "--limit",
            "4",
            "--quantize",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["coverage"]["tracer"] == "torch.fx meta tracer, static input shape (1, 3, 32, 32)"
