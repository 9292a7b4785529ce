"""The same command twice gives bit-identical quantized weights and JSON figures (timings aside),
whatever the global RNG state in between."""

import json
import random

import numpy as np
import pytest
import torch
from fuzz_checks import random_quant_config
from strategies import build, example_input, random_spec

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.cli import main
from dfq.records import records_to_dict

VOLATILE = {"timings", "seconds", "seconds_per_arch"}


def _strip(obj):
    """Drop wall-clock figures, recursively."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("seed", range(6))
def test_pipeline_twice_is_bit_identical_on_random_architectures(seed):
    spec = random_spec(1000 + seed)
    cfg = random_quant_config(random.Random(seed))
    m = build(spec)
    a = quantize_model(m, cfg)
    torch.manual_seed(seed + 123)  # a different global RNG state must not matter
    random.seed(seed + 7)
    np.random.seed(seed)
    b = quantize_model(m, cfg)
    assert _state_equal(a.model.state_dict(), b.model.state_dict())
    assert _strip(records_to_dict(a.layers)) == _strip(records_to_dict(b.layers))
    assert a.activations == b.activations
    x = example_input(spec)
    assert torch.equal(a.model(x), b.model(x))


def test_data_driven_pipeline_twice_is_bit_identical():
    spec = random_spec(7)
    m, x = build(spec), example_input(spec)
    cfg = PipelineConfig(
        equalize=True,
        correction="distill",
        calib=len(x),
        range_percentile=99.0,
        quant=QuantConfig(bits_weight=6, per_channel=True),
    )
    a = quantize_model(m, cfg, calib_data=[x])
    b = quantize_model(m, cfg, calib_data=[x])
    assert (
        _state_equal(a.model.state_dict(), b.model.state_dict()) and a.activations == b.activations
    )


NET = """import torch
from torch import nn
def build():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU6(),
                      nn.Conv2d(6, 6, 3, groups=6), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))
    for bn in (m[1], m[4]):
        bn.weight.data.uniform_(0.3, 1.5); bn.bias.data.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.3); bn.running_var.uniform_(0.5, 2)
    return m.eval()
"""


@pytest.mark.parametrize(
    "extra",
    [
        ["--relu", "--equalize", "--correction", "--compare"],
        [
            "--equalize",
            "--distill_range",
            "--correction",
            "distill",
            "--dis_batch_size",
            "2",
            "--dis_num_batch",
            "1",
            "--dis_iterations",
            "3",
            "--distill_seconds",
            "1000",
        ],
    ],
)
def test_same_command_twice_gives_identical_json(tmp_path, capsys, extra):
    (tmp_path / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "imgs.npz",
        images=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
        labels=np.arange(6),
    )
    outs = []
    for k in range(2):
        torch.manual_seed(
            k
        )  # the command seeds itself (--seed): the caller's state must not leak in
        argv = [
            "cls",
            "--model",
            f"{tmp_path / 'net.py'}:build",
            "--data",
            str(tmp_path / "imgs.npz"),
            "--resize",
            "0",
            "--crop",
            "0",
            "--quantize",
            "--quiet",
            *extra,
            "--json",
            str(tmp_path / f"{k}.json"),
        ]
        assert main(argv) == 0
        outs.append(json.loads((tmp_path / f"{k}.json").read_text()))
    capsys.readouterr()
    assert "timings" in outs[0]
    assert _strip(outs[0]) == _strip(outs[1])
