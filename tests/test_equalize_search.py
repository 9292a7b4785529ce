"""Equalization scales chosen on data: the float function stays exact, each pair's quantized
error is no worse than the closed form's, and the choice is reported."""

import functools
import json

import pytest
import torch
from conftest import SmallNet, randomize_bn, resnet20_args, shared

from dfq import PipelineConfig, QuantConfig, equalize, fold_batchnorm, quantize_model, trace
from dfq.cli import main
from dfq.config import EqualizeConfig
from dfq.transforms.equalize_search import POWERS, search_scales_


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 16, 16, generator=g, dtype=dtype)]


def test_searched_scales_keep_the_float_function_float64():
    torch.manual_seed(0)
    net = randomize_bn(SmallNet(relu=torch.nn.ReLU)).double()
    t = fold_batchnorm(trace(net))
    search = functools.partial(search_scales_, data=_data(torch.float64), quant=QuantConfig(4, 4))
    eq = equalize(t.gm, t.stats, search=search)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    assert (eq.gm(x) - t.gm(x)).abs().max() <= 1e-6
    chosen = {k: v for k, v in eq.info.items() if v.equalize_power is not None}
    assert set(chosen) == {"dw.0", "head.0"}
    for v in chosen.values():
        assert v.equalize_power in POWERS
        assert v.pair_mse_chosen <= v.pair_mse_closed_form


def test_search_lowers_the_w4a4_error_and_clips_follow():
    torch.manual_seed(0)
    net = randomize_bn(SmallNet()).eval()  # ReLU6 kept: its ChannelMin bounds move with s
    base = PipelineConfig(equalize=True, correction=True, quant=QuantConfig(4, 4))
    searched = PipelineConfig(
        equalize=True,
        correction=True,
        equalization=EqualizeConfig(search=True),
        quant=QuantConfig(4, 4),
    )
    assert searched.needs_data and not base.needs_data
    with pytest.raises(ValueError, match="calib_data"):
        quantize_model(net, searched)
    x = torch.randn(256, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    errors = []
    for config in (base, searched):
        r = quantize_model(net, config, calib_data=_data())
        with torch.no_grad():
            errors.append(float((r.model(x) - net(x)).pow(2).mean()))
        with torch.no_grad():  # the float model after the float transforms is still the model
            assert (r.float_model(x) - net(x)).abs().max() <= 1e-4
    assert errors[1] < errors[0]


def test_cli_equalize_search_reports_powers(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        ["cls", *resnet20_args(), "--data", str(shared("cifar10_foolbox20.npz"))]
        + ["--quantize", "--equalize", "--equalize_search", "--true_data", "8", "--limit", "8"]
        + ["--bits_weight", "4", "--per_channel", "--json", str(out), "--quiet"]
    )
    assert code == 0
    layers = json.loads(out.read_text())["layers"]
    powers = [v["equalize_power"] for v in layers.values() if "equalize_power" in v]
    assert powers and all(p in POWERS for p in powers)
