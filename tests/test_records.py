"""The typed per-layer records: only the fields set reach the JSON report, in the order they
were set, they come back from it, a misspelt field fails, and merging keeps every step's."""

import json

import pytest
from conftest import shared

from dfq import PipelineConfig, quantize_model
from dfq.records import (
    FIELDS,
    LayerRecord,
    merge_records,
    records_from_dict,
    records_to_dict,
)


def test_to_dict_emits_only_the_fields_set_in_their_order_and_round_trips():
    rec = LayerRecord(bn_folded=False, note="BatchNorm left in float: x")
    rec.bits_input = None  # set to None is set
    rec.bn_folded = "bn1"  # setting again keeps its place, as dict.update did
    rec.extra["weights"] = 12
    d = rec.to_dict()
    assert list(d) == ["bn_folded", "note", "bits_input", "weights"]
    assert d["bn_folded"] == "bn1" and d["bits_input"] is None and d["weights"] == 12
    assert LayerRecord().to_dict() == {}
    back = LayerRecord.from_dict(json.loads(json.dumps(d)))
    assert back == rec and back.to_dict() == d and list(back.to_dict()) == list(d)
    assert back.extra == {"weights": 12} and back.is_set("bits_input") and not back.is_set("bits")
    del back.note  # unset again (as dict.pop)
    assert "note" not in back.to_dict() and back.note is None
    report = {"conv": rec, "x": LayerRecord(activation_range=[0.0, 6.0], bits=8)}
    assert records_from_dict(json.loads(json.dumps(records_to_dict(report)))) == report


def test_an_unknown_field_raises():
    rec = LayerRecord()
    with pytest.raises(AttributeError, match="equalise_note"):
        rec.equalise_note = "typo"
    with pytest.raises(AttributeError):
        rec.equalise_note  # noqa: B018
    with pytest.raises(TypeError, match="bn_fold"):
        LayerRecord(bn_fold="bn")
    with pytest.raises(AttributeError):
        rec.is_set("bitz")
    assert "extra" not in FIELDS and {"bn_folded", "equalize_note", "bits_weight"} <= FIELDS


def test_merging_keeps_both_steps_fields():
    folded = LayerRecord(type="Conv2d", kind="conv", shape=[8, 3, 3, 3])
    folded.merge(LayerRecord(bn_folded="bn"))
    folded.merge(LayerRecord(equalized=True, equalized_with="fc"))
    folded.merge(LayerRecord(bn_folded="bn2", bits_weight=8, extra={"mine": 1}))
    assert folded.to_dict() == {
        "type": "Conv2d",
        "kind": "conv",
        "shape": [8, 3, 3, 3],
        "bn_folded": "bn2",
        "equalized": True,
        "equalized_with": "fc",
        "bits_weight": 8,
        "mine": 1,
    }
    report = {"a": LayerRecord(bits_weight=4)}
    step = {"a": LayerRecord(bias="int32"), "b": LayerRecord(relu6="replaced by ReLU")}
    merge_records(report, step)
    assert report["a"].to_dict() == {"bits_weight": 4, "bias": "int32"}
    assert report["b"] == step["b"] and report["b"] is not step["b"]  # a copy, not the step's
    with pytest.raises(TypeError, match="LayerRecord"):
        merge_records(report, {"c": {"bits": 8}})


def test_the_pipeline_reports_records_json_ready(small_net):
    res = quantize_model(small_net, PipelineConfig(relu=True, equalize=True, correction=True))
    assert all(
        isinstance(v, LayerRecord) for v in [*res.layers.values(), *res.activations.values()]
    )
    layers = json.loads(json.dumps(records_to_dict(res.layers)))
    assert records_from_dict(layers) == res.layers
    assert layers["stem.0"]["bn_folded"] == "stem.1" and layers["dw.0"]["equalized"] is True
    assert all("bits_weight" in v for k, v in layers.items() if "kind" in v)


def test_the_cli_json_report_holds_the_records(tmp_path, capsys):
    from dfq.cli import main

    src = tmp_path / "tiny.py"
    src.write_text(
        "import torch\n"
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(),\n"
        "        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))\n"
    )
    out = tmp_path / "r.json"
    argv = ["cls", "--model", f"{src}:build", "--data", str(shared("cifar10_foolbox20.npz"))]
    argv += ["--resize", "0", "--crop", "0", "--limit", "4", "--quiet"]
    argv += ["--quantize", "--relu", "--equalize", "--correction", "--json", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    r = json.loads(out.read_text())
    layers = records_from_dict(r["layers"])
    assert records_to_dict(layers) == r["layers"]
    assert layers["0"].bn_folded == "1" and layers["3"].bn_folded == "4"  # folded
    assert layers["0"].equalized and layers["0"].equalized_with == "3"  # equalized
    assert layers["0"].channel_ranges_before is not None
    for name in ("0", "3", "8"):  # quantized, with their bias corrected and quantized
        assert layers[name].kind is not None and layers[name].bits_weight == 8
        assert layers[name].bias_correction_max is not None and layers[name].bias is not None
    assert "equalize_note" in r["layers"]["8"] and "bn_folded" not in r["layers"]["8"]
    acts = records_from_dict(r["activations"])
    assert acts and all(a.activation_range is not None and a.bits == 8 for a in acts.values())
