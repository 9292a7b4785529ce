"""--save-quantized / --load-quantized: a saved result, restored without data, computes exactly
what was saved (reconstruction is not repeated)."""

import json

import pytest
import torch
from conftest import SmallNet, randomize_bn, resnet20_args, shared

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.cli import main
from dfq.config import ReconstructConfig
from dfq.errors import DfqError
from dfq.quant.saved import load_quantized, save_quantized


def test_restored_model_equals_the_saved_one(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(SmallNet())
    data = [torch.randn(16, 3, 12, 12)]
    cfg = PipelineConfig(
        correction=True,
        reconstruct=True,
        reconstruction=ReconstructConfig(iterations=10),
        quant=QuantConfig(bits_weight=4, bits_activation=6, per_channel=True, keep_first_last=8),
    )
    res = quantize_model(model, cfg, calib_data=data)
    save_quantized(tmp_path / "q.pt", res.model, res.config)
    config, restore = load_quantized(tmp_path / "q.pt")
    assert config == res.config
    back = quantize_model(model, config, restore=restore)  # no data, no reconstruction
    assert "reconstruct" not in back.timings and "restore" in back.timings
    sa, sb = res.model.state_dict(), back.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(res.model(x), back.model(x))
    # a different model does not fit
    other = PipelineConfig(quant=QuantConfig(per_channel=False))
    with pytest.raises(DfqError, match="does not fit"):
        quantize_model(model, other, restore=restore)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(DfqError, match="not a readable"):
        load_quantized(tmp_path / "bad.pt")


def test_a_file_from_before_input_bits_keeps_its_input_grid(tmp_path):
    """Saved before the network input had its own width: that input was at the activations'."""
    torch.manual_seed(0)
    model = randomize_bn(SmallNet())
    cfg = PipelineConfig(quant=QuantConfig(bits_weight=6, bits_activation=6, input_bits=6))
    res = quantize_model(model, cfg)
    save_quantized(tmp_path / "q.pt", res.model, res.config)
    blob = torch.load(tmp_path / "q.pt", weights_only=True)
    del blob["config"]["quant"]["input_bits"]
    torch.save(blob, tmp_path / "old.pt")
    config, restore = load_quantized(tmp_path / "old.pt")
    assert config.quant.network_input_bits == 6
    back = quantize_model(model, config, restore=restore)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(res.model(x), back.model(x))


def test_cli_save_then_load_gives_the_same_predictions(tmp_path, capsys):
    common = [
        "cls",
        *resnet20_args(),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
        "--limit",
        "8",
        "--quiet",
        "--compare",
    ]
    saved = tmp_path / "r20.pt"
    assert (
        main(
            [
                *common,
                "--quantize",
                "--per_channel",
                "--bits_weight",
                "4",
                "--bits_activation",
                "4",
                "--true_data",
                "8",
                "--reconstruct",
                "--reconstruct_iters",
                "3",
                "--save_quantized",
                str(saved),
                "--json",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    assert main([*common, "--load_quantized", str(saved), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    for k in ("top1", "agreement", "logits_sqnr_db", "weight_bytes"):
        assert a[k] == b[k]
    assert b["config"] == a["config"] and b["reconstruction"] == a["reconstruction"]
    assert "reconstruct" not in b["timings"]
    assert b["quantization_data"]["source"].startswith("restored")
    capsys.readouterr()
    assert main([*common, "--load_quantized", str(saved), "--ablation"]) == 2
    assert "--load_quantized" in capsys.readouterr().err
