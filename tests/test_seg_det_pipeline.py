"""The whole pipeline on the DeepLab-v3+ and SSD-Lite bodies: float invariance of equalization
(float64, randomised BN, with ReLU6 kept and with --relu), the pairs it finds and what it
leaves alone, and finite fake-quant outputs; bilinear upsampling as a pass-through op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn
from torch import nn

from dfq import quantize_model
from dfq.config import PipelineConfig
from dfq.graph.layers import find_pairs
from dfq.graph.trace import trace
from dfq.models import build
from dfq.statistics.moments import input_moments, propagate
from dfq.transforms.bn_fold import fold_batchnorm

CASES = {"deeplabv3plus_mobilenetv2": 65, "ssdlite_mobilenetv2": 300}


def _outputs(y):
    return y if isinstance(y, tuple) else (y,)


def _max_err(a, b) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(_outputs(a), _outputs(b)))


@pytest.fixture(scope="module", params=list(CASES))
def body(request):
    torch.manual_seed(0)
    model = randomize_bn(build(request.param), seed=1).double()
    size = CASES[request.param]
    x = torch.randn(
        2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    return request.param, model, x


@pytest.mark.parametrize("relu", [False, True])
def test_equalization_keeps_the_float_output(body, relu):
    name, model, x = body
    base = PipelineConfig(quantize=False, relu=relu)
    with torch.no_grad():
        # --relu changes the float model on purpose: the reference is that changed model
        ref = quantize_model(model, base).model(x) if relu else model(x)
        res = quantize_model(
            model, PipelineConfig(quantize=False, relu=relu, equalize=True, absorption=False)
        )
        out = res.model(x)
    assert isinstance(out, tuple) == (
        name == "ssdlite_mobilenetv2"
    )  # the forward's signature is kept
    assert _max_err(ref, out) <= 1e-6
    pairs = [k for k, v in res.layers.items() if v.equalized_with]
    left = {k: v.equalize_note for k, v in res.layers.items() if v.equalize_note}
    assert len(pairs) >= (35 if name.startswith("deeplab") else 50)
    assert left and all(
        isinstance(v, str) and v for v in left.values()
    )  # what it leaves alone, and why
    assert "its output feeds a residual add" in left.values()
    assert not any("interpolate" in v for v in left.values())  # upsampling is looked through


def test_quantized_bodies_are_finite(body):
    name, model, x = body
    model = model.float()
    try:
        for cfg in (
            PipelineConfig(),
            PipelineConfig(relu=True, equalize=True, correction=True),
            PipelineConfig(equalize=True, correction=True, clip_weight=15.0),
        ):
            res = quantize_model(model, cfg)
            with torch.no_grad():
                out, ref = res.model(x.float()), model(x.float())
            assert all(torch.isfinite(o).all() for o in _outputs(out))
            assert [o.shape for o in _outputs(out)] == [r.shape for r in _outputs(ref)]
    finally:
        model.double()


class Upsampler(nn.Module):
    """conv-BN-ReLU -> bilinear x2 -> conv, and a cat of an upsampled branch with a skip."""

    def __init__(self, module: bool):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.up = (
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False) if module else None
        )
        self.b = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.c = nn.Conv2d(5 + 3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        y = (
            self.up(y)
            if self.up is not None
            else F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=True)
        )
        y = self.b(y)
        skip = F.interpolate(x, size=y.shape[2:], mode="nearest")
        return self.c(torch.cat([y, skip], dim=1))


@pytest.mark.parametrize("module", [False, True])
def test_upsampling_is_a_pass_through(module):
    model = randomize_bn(Upsampler(module), seed=3).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded = fold_batchnorm(trace(model))
    pairs, skipped = find_pairs(folded.gm)
    assert [(p.first, p.second) for p in pairs] == [("a.0", "b.0")]
    assert skipped["b.0"] == "its output feeds a concatenation"
    res = quantize_model(model, PipelineConfig(quantize=False, equalize=True, absorption=False))
    with torch.no_grad():
        assert float((res.model(x) - model(x)).abs().max()) <= 1e-6
    # moments reach through the upsampling into the concatenation (bias correction reads them)
    moments = propagate(
        folded.gm, folded.stats, input_moments((0.5,) * 3, (0.25,) * 3, torch.float64)
    )
    cat = next(n for n in folded.gm.graph.nodes if n.target is torch.cat)
    assert cat.name in moments and moments[cat.name].mean.shape == (8,)
