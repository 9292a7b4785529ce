"""--arch timm:NAME: timm's pretrained_cfg as the input defaults, weights from a local
.safetensors or .pth file, and timm's CNN building blocks covered by the pipeline."""

import json

import pytest
import torch
from conftest import randomize_bn, shared

from dfq import DfqError, PipelineConfig, quantize_model
from dfq.cli import main
from dfq.models.checkpoints import load_weights
from dfq.models.registry import build, input_config

timm = pytest.importorskip(
    "timm", reason='the timm extra is not installed: pip install "dfq[timm]"'
)


def test_pretrained_cfg_is_the_input_config():
    c = input_config("timm:tf_efficientnet_lite0")
    assert c.size == (3, 224, 224) and c.mean == (0.5, 0.5, 0.5) and c.std == (0.5, 0.5, 0.5)
    assert (c.resize, c.crop, c.interpolation) == (256, 224, "bicubic")  # 224 / crop_pct 0.875
    r = input_config("timm:resnet18")
    assert (r.resize, r.crop) == (235, 224)  # crop_pct 0.95


def test_unknown_timm_name_suggests_close_ones():
    with pytest.raises(DfqError, match="timm:resnet18"):
        build("timm:resnet_18")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_from_a_local_file(tmp_path, suffix):
    src = randomize_bn(build("timm:lcnet_050", num_classes=7))
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    dst = load_weights(build("timm:lcnet_050", num_classes=7), str(path))
    assert all(
        torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values())
    )


def test_timm_blocks_are_fully_covered():
    """BatchNormAct2d (functional batch_norm), hard-swish, SE with x.mean((2, 3)), the Linear
    wrapper (F.linear): all folded, quantized and ranged."""
    torch.manual_seed(0)
    model = randomize_bn(build("timm:lcnet_050", num_classes=10))
    r = quantize_model(model, PipelineConfig(equalize=True, correction=True, strict=True))
    c = r.coverage
    assert c["bn_folded"] == c["bn_total"] == 27
    assert c["layers_quantized"] == c["layers_total"] == 33
    assert c["activations_ranged"] == c["activation_quantizers_total"]


def test_cli_timm_arch_with_safetensors_weights(tmp_path, capsys):
    from safetensors.torch import save_file

    w = tmp_path / "lcnet.safetensors"
    save_file(randomize_bn(build("timm:lcnet_050", num_classes=10)).state_dict(), str(w))
    out = tmp_path / "r.json"
    code = main(
        [
            "cls",
            "--arch",
            "timm:lcnet_050",
            "--num_classes",
            "10",
            "--weights",
            str(w),
            "--data",
            str(shared("cifar10_foolbox20.npz")),
            "--resize",
            "0",
            "--crop",
            "0",
            "--limit",
            "4",
            "--quantize",
            "--strict",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert "coverage: BN folded 27/27" in capsys.readouterr().out
    assert json.loads(out.read_text())["coverage"]["layers_quantized"] == 33


def test_same_padding_model_traces_with_static_shapes():
    """tf_efficientnet_lite0 pads "same" in Python from the input's shape: symbolic tracing
    fails, the static-shape tracer gets it, and its pads and convs become plain layers."""
    torch.manual_seed(0)
    model = randomize_bn(build("timm:tf_efficientnet_lite0", num_classes=10))
    r = quantize_model(model, PipelineConfig(equalize=True, strict=True, input_size=(3, 64, 64)))
    c = r.coverage
    assert c["tracer"] == "torch.fx meta tracer, static input shape (1, 3, 64, 64)"
    assert c["bn_folded"] == c["bn_total"] == 49 and c["layers_quantized"] == 50
