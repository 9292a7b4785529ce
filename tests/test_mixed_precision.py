"""Mixed precision: --keep_first_last and --layer_bits reach the right layers, the weights sit
on grids of those widths, the report says so, and bad flags are one-line errors."""

import json
import re

import pytest
import torch
from conftest import SmallNet, randomize_bn, resnet20_args, shared

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.cli import main
from dfq.errors import DfqError
from dfq.quant.mixed import weight_size


def _model():
    torch.manual_seed(0)
    return randomize_bn(SmallNet())


def _levels(layer) -> int:
    return int(layer.int_weight().unique().numel())


def test_keep_first_last_and_patterns_reach_the_right_layers():
    q = QuantConfig(
        bits_weight=4,
        bits_activation=6,
        per_channel=True,
        keep_first_last=8,
        layer_bits=(("dw.*", 6, 8), ("head.0", 3, None)),
    )
    r = quantize_model(_model(), PipelineConfig(quant=q))
    bits = {k: (v.bits_weight, v.bits_input) for k, v in r.layers.items()}
    assert bits == {
        "stem.0": (8, 8),
        "dw.0": (6, 8),
        "pw.0": (4, 6),
        "head.0": (3, 6),
        "fc": (8, 8),
    }
    gm = r.model
    for name, (w, _) in bits.items():
        layer = gm.get_submodule(name)
        assert layer.weight_grid.bits == w
        qi = layer.int_weight()
        assert qi.abs().max() <= 2 ** (w - 1) - 1
        # the dequantized weights are exactly the integers times the scale
        s = layer.weight_scale.reshape(-1, *([1] * (qi.dim() - 1)))
        assert torch.equal(layer.weight, (qi.double() * s.double()).float())
    assert _levels(gm.get_submodule("pw.0")) <= 15 < _levels(gm.get_submodule("stem.0"))
    # the quantizer dw.0 reads (the stem's output) has 8 bits; pw.0 reads a 6-bit one
    assert r.activations["stem_2"].bits == 8 and r.activations["dw_2"].bits == 6
    size = weight_size(r.layers)
    n = {k: torch.Size(v.shape).numel() for k, v in r.layers.items()}
    expect = sum(n[k] * w for k, (w, _) in bits.items())
    assert size["weight_bytes"] == -(-expect // 8)
    assert size["fp32_weight_bytes"] == 4 * sum(n.values())


def test_default_bits_are_untouched():
    r = quantize_model(_model(), PipelineConfig(quant=QuantConfig(bits_weight=4)))
    assert {v.bits_weight for v in r.layers.values()} == {4}
    assert {v.bits for v in r.activations.values()} == {8}


def _input_levels(r) -> int:
    """Distinct values the network input's quantizer lets through, on a fine ramp."""
    placeholder = next(n for n in r.model.graph.nodes if n.op == "placeholder")
    aq = r.model.get_submodule(f"act_quant_{placeholder.name}")
    return int(aq(torch.linspace(-3, 3, 10_000)).unique().numel())


@pytest.mark.parametrize(
    "quant, input_bits",
    [
        (QuantConfig(bits_weight=6, bits_activation=6), 8),  # an image keeps its 8 bits
        (QuantConfig(bits_weight=6, bits_activation=6, input_bits=6), 6),
        (QuantConfig(bits_activation=12), 12),  # never fewer bits than the activations
        (QuantConfig(bits_activation=4, input_bits=6, keep_first_last=8), 8),  # first layer's
        (QuantConfig(bits_activation=4, layer_bits=(("stem.0", 4, 4),)), 4),  # its override
    ],
)
def test_the_network_input_is_quantized_at_its_own_width(quant, input_bits):
    r = quantize_model(_model(), PipelineConfig(quant=quant))
    assert r.layers["stem.0"].bits_input == input_bits
    assert 2 ** (input_bits - 1) < _input_levels(r) <= 2**input_bits
    others = [v.bits for k, v in r.activations.items() if k != "x"]
    assert others.count(quant.bits_activation) >= len(others) - 2
    # the summary line counts every width, the input's included
    widths = r.coverage["bits"]["activations"]
    assert sum(widths.values()) == len(r.activations)
    assert widths.get(str(input_bits), 0) >= 1


def test_an_int8_runtime_refuses_a_wider_input():
    with pytest.raises(DfqError, match="input of 12 bits"):
        quantize_model(_model(), PipelineConfig(quant=QuantConfig(input_bits=12, target="ort")))


@pytest.mark.parametrize("target", ["ort", "ncnn"])
@pytest.mark.parametrize(
    "mixed,needle",
    [
        ({"keep_first_last": 16}, "`keep_first_last`=16"),
        ({"layer_bits": (("stem.0", 16, None),)}, "`layer_bits` stem.0=16"),
        ({"layer_bits": (("dw.*", 8, 12),)}, r"`layer_bits` dw\.\*=8,12"),
    ],
)
def test_an_int8_runtime_refuses_wider_first_last_or_layer_bits(target, mixed, needle):
    """issue #36: the int8 check saw the model-wide widths only; keep_first_last and layer_bits
    above 8 bits slipped through to the exporter."""
    q = QuantConfig(target=target, **mixed)
    with pytest.raises(DfqError, match=rf"{needle}.*the {target} target runs int8 only"):
        quantize_model(_model(), PipelineConfig(quant=q))


def test_an_int8_runtime_takes_first_last_and_layer_bits_up_to_8():
    q = QuantConfig(target="ort", bits_weight=4, keep_first_last=8, layer_bits=(("dw.*", 6, 8),))
    r = quantize_model(_model(), PipelineConfig(quant=q))
    assert r.config.quant.keep_first_last == 8


def test_unmatched_pattern_names_it_and_lists_layers():
    q = QuantConfig(layer_bits=(("features.*", 8, None),))
    with pytest.raises(DfqError, match=r"'features\.\*' matches no .*stem\.0, dw\.0"):
        quantize_model(_model(), PipelineConfig(quant=q))


def test_config_round_trips_through_json():
    cfg = PipelineConfig(
        quant=QuantConfig(keep_first_last=8, layer_bits=(("a*", 6, None), ("b", 4, 8)))
    )
    back = PipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(DfqError, match="out of range"):
        QuantConfig(layer_bits=(("a", 1, None),))


def _cli(capsys, *extra):
    code = main(
        [
            "cls",
            *resnet20_args(),
            "--data",
            str(shared("cifar10_foolbox20.npz")),
            "--quantize",
            "--quiet",
            *extra,
        ]
    )
    return code, capsys.readouterr()


def test_cli_reports_bits_and_weight_size(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _ = _cli(
        capsys,
        "--bits_weight",
        "4",
        "--keep_first_last",
        "8",
        "--layer_bits",
        "layer3.*=6,8",
        "--limit",
        "4",
        "--json",
        str(out),
    )
    assert code == 0
    r = json.loads(out.read_text())
    layers = r["layers"]
    assert layers["conv1"]["bits_weight"] == 8 and layers["linear"]["bits_weight"] == 8
    assert (
        layers["layer3.0.conv1"]["bits_weight"] == 6 and layers["layer3.0.conv1"]["bits_input"] == 8
    )
    assert layers["layer2.0.conv1"]["bits_weight"] == 4
    assert r["weight_bytes"] < r["fp32_weight_bytes"] / 4


@pytest.mark.parametrize(
    "flag, message", [("nope*=4", "'nope\\*' matches no"), ("conv1", "not PATTERN=W")]
)
def test_cli_bad_layer_bits_is_one_line(capsys, flag, message):
    code, out = _cli(capsys, "--layer_bits", flag)
    assert code == 2
    assert out.err.count("\n") == 1 and re.search(message, out.err)
