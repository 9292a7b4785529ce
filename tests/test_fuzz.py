"""Random architectures through the whole pipeline (tests/strategies.py, tests/fuzz_checks.py):
no exception, no NaN/Inf, float64 invariance of folding + equalization, absorption exact where
its premise holds, a bit-width-derived SQNR bound, and the user's model untouched.

Derandomized (a fixed sequence of examples, so CI is deterministic) and modest in number;
benchmarks/fuzz.py runs a thousand."""

import random

import pytest
import torch
from fuzz_checks import check_architecture, random_quant_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import DROPS, architectures, build, example_input, random_spec

from dfq import PipelineConfig, QuantConfig, quantize_model

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(
    spec=architectures(),
    bits=st.sampled_from([8, 16]),
    cfg_seed=st.integers(0, 2**16),
    train_mode=st.booleans(),
)
def test_random_architecture_invariants(spec, bits, cfg_seed, train_mode):
    torch.set_num_threads(1)
    check_architecture(spec, random_quant_config(random.Random(cfg_seed)), bits, train_mode)


@pytest.mark.parametrize("seed", [12, 163])
def test_w16a16_int32_bias_does_not_overflow(seed):
    """Regression (fuzzer): at W16A16, s_w * s_in is ~2^-31 of the ranges, so an int32 bias at
    that scale was clamped silently (SQNR 1-20 dB at 16 bits). It now goes on its own range."""
    spec = random_spec(seed, modern=False)  # the architectures the fuzzer found it on
    m, x = build(spec), example_input(spec)
    cfg = PipelineConfig(
        equalize=True,
        correction="bn",
        calib=len(x),
        quant=QuantConfig(bits_weight=16, bits_activation=16),
    )
    res = quantize_model(m, cfg, calib_data=[x])
    from dfq.quant.primitives import sqnr_db

    assert sqnr_db(m(x), res.model(x)) > 56
    notes = [n.bias or "" for n in res.layers.values()]
    assert any("overflows int32" in n for n in notes)


def test_strategy_covers_the_advertised_ops():
    """The generator really draws branches, concats, pads, upsampling, dead channels, gammas."""
    import json

    text = json.dumps([random_spec(i) for i in range(200)])
    for needle in (
        '"residual"',
        '"concat"',
        '"pad"',
        '"upsample"',
        '"dropout"',
        '"dw"',
        '"grouped"',
        '"dw_mult"',
        '"tiny"',
        '"huge"',
        '"zero"',
        '"flatten_linear"',
        '"relu6_fn"',
        '"silu"',
        '"same"',
        '"reflect"',
        '"gelu_tanh"',
        '"mish"',
        '"elu"',
        '"sigmoid_method"',
        '"se"',
        '"hardsigmoid"',
        '"functional": true',
        *(f'"{k}"' for k in DROPS),
    ):
        assert needle in text, needle
    assert '"dead": 0' in text and '"dead": 1' in text


class _PadBetween(torch.nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        from conftest import randomize_bn

        self.a = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
        )
        self.pad = torch.nn.ZeroPad2d(1)
        self.functional = functional
        self.b = torch.nn.Conv2d(4, 2, 1)
        randomize_bn(self)
        with torch.no_grad():  # a high bias: beta >> 3 gamma, so absorption wants to move it
            self.a[1].bias.fill_(5.0)
            self.a[1].weight.fill_(0.5)

    def forward(self, x):
        y = self.a(x)
        y = torch.nn.functional.pad(y, (1, 1, 1, 1)) if self.functional else self.pad(y)
        return self.b(y)


@pytest.mark.parametrize("functional", [False, True])
def test_absorption_is_not_applied_across_zero_padding(functional):
    """Regression (fuzzer): with a ZeroPad2d / F.pad between the pair, the padded zeros do not
    take the shift c, so absorption put W2 c on every border pixel (errors of 0.06-0.35)."""
    torch.manual_seed(0)
    m = _PadBetween(functional).double().eval()
    res = quantize_model(m, PipelineConfig(quantize=False, equalize=True))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert (res.model(x) - m(x)).abs().max() < 1e-9
    assert "zero-pads between" in res.layers["a.0"].absorption_note
