"""The `dfq cls` contract end to end on a real model, and its one-line errors."""

import json

import pytest
import torch
from conftest import resnet20_args, shared
from torch import nn

from dfq import PipelineConfig
from dfq.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cls_resnet20_cifar_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    code, out, _ = _run(
        capsys,
        "cls",
        *resnet20_args(),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
        "--quantize",
        "--equalize",
        "--correction",
        "--compare",
        "--quiet",
        "--json",
        str(out_json),
    )
    assert code == 0
    r = json.loads(out_json.read_text())
    assert r["n"] == 20 and r["fp32_top1"] == 100.0
    assert r["top1"] >= 90.0 and r["agreement"] >= 90.0
    assert r["config"]["equalize"] and r["config"]["quant"]["bits_weight"] == 8
    assert {"trace", "fold_bn", "equalize", "total", "evaluate"} <= set(r["timings"])
    assert r["layers"]["conv1"]["bn_folded"] == "bn1"
    assert "top1" in out


def test_cls_ablation_prints_the_table(tmp_path, capsys):
    code, out, _ = _run(
        capsys,
        "cls",
        *resnet20_args(),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
        "--ablation",
        "--quiet",
        "--limit",
        "8",
        "--json",
        str(tmp_path / "a.json"),
    )
    assert code == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [r["name"] for r in rows] == [
        "FP32",
        "Original",
        "+ReLU",
        "+ReLU+LE",
        "+BC",
        "+BC+clip_15",
        "+ReLU+LE+BC",
    ]
    assert "| +ReLU+LE+BC" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--arch", "no_such_net"], "Unknown architecture"),
        (["--arch", "cifar_resnet20", "--weights", "/nonexistent.pth"], "does not exist"),
        (
            ["--arch", "cifar_resnet20", "--equalize", "--absorption", "--bits_weight", "1"],
            "out of range",
        ),
        (["--arch", "cifar_resnet20", "--absorption"], "--absorption needs --equalize"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, needle):
    code, _, err = _run(
        capsys, "cls", *argv, "--data", str(shared("cifar10_foolbox20.npz")), "--quantize"
    )
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_corrupt_and_mismatched_weights(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = _run(
        capsys,
        "cls",
        "--arch",
        "cifar_resnet20",
        "--weights",
        str(bad),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
    )
    assert code == 2 and "corrupt" in err
    code, _, err = _run(
        capsys,
        "cls",
        "--arch",
        "cifar_resnet56",
        "--weights",
        str(shared("cifar10_resnet20-12fca82f.th")),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
    )
    assert code == 2 and "missing" in err and "layer1.3" in err


def test_unknown_data_format(tmp_path, capsys):
    f = tmp_path / "x.npz"
    import numpy as np

    np.savez(f, foo=np.zeros(3))
    code, _, err = _run(capsys, "cls", "--arch", "cifar_resnet20", "--data", str(f))
    assert code == 2 and "not a known image format" in err


def test_user_model_spec(tmp_path, capsys):
    src = tmp_path / "mynet.py"
    src.write_text(
        "import torch\n"
        "def build():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),\n"
        "        torch.nn.ReLU(),\n"
        "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 10))\n"
    )
    code, out, _ = _run(
        capsys,
        "cls",
        "--model",
        f"{src}:build",
        "--data",
        str(shared("cifar10_foolbox20.npz")),
        "--resize",
        "0",
        "--crop",
        "0",
        "--quantize",
        "--quiet",
    )
    assert code == 0 and "top1" in out
    assert torch.__version__


def test_plot_writes_the_worst_layers_ranges(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, _ = _run(
        capsys,
        "cls",
        *resnet20_args(),
        "--data",
        str(shared("cifar10_foolbox20.npz")),
        "--quantize",
        "--equalize",
        "--quiet",
        "--limit",
        "4",
        "--plot",
        str(tmp_path / "plots"),
    )
    pngs = list((tmp_path / "plots").glob("weight_ranges_*.png"))
    assert code == 0 and len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_distilled_ranges_default_to_a_percentile_real_ones_to_min_max():
    from dfq.cli.options import pipeline_config
    from dfq.cli.parser import build_parser

    def cfg(*extra):
        return pipeline_config(
            build_parser().parse_args(["cls", "--arch", "x", "--data", "d", "--quantize", *extra])
        )

    assert cfg("--distill_range").range_percentile == 99.99
    assert cfg("--distill_range", "--true_data", "64").range_percentile is None
    assert cfg("--calib", "64").range_percentile is None
    assert cfg("--distill_range", "--range_percentile", "99.9").range_percentile == 99.9
    # the library owns the default: the Python API gets the same as the CLI
    assert PipelineConfig(distill_range=True).range_percentile == 99.99
    assert PipelineConfig(distill_range=True, true_data=64).range_percentile is None
    assert PipelineConfig(calib=64).range_percentile is None


def test_distillation_defaults_are_the_measured_best():
    from dfq.cli.options import data_spec, pipeline_config
    from dfq.cli.parser import build_parser

    def spec(arch, *extra):
        argv = ["cls", "--arch", arch, "--data", "d", "--quantize", "--distill_range", *extra]
        args = build_parser().parse_args(argv)
        return data_spec(args, pipeline_config(args)).distill

    imagenet = spec("mobilenet_v2")
    assert imagenet.resolution == (112, 112) and imagenet.batch_size * imagenet.num_batches == 64
    assert imagenet.seconds is None  # the steps decide, no clock
    assert spec("cifar_resnet20").resolution is None  # 32 px: the input's own size
    assert spec("mobilenet_v2", "--dis_resolution", "224").resolution == (224, 224)
    # ranges: ZeroQ's images (per image, pixels, early stop); reconstruction: batch statistics
    # on a spectrum, class-conditioned, 150 steps, 128 images
    ranges = (imagenet.stats, imagenet.param, imagenet.label_loss, imagenet.jitter)
    assert ranges == ("image", "pixels", 0.0, 0) and imagenet.threshold_factor == 5.0
    rec = spec("mobilenet_v2", "--reconstruct")
    assert (rec.stats, rec.param, rec.label_loss, rec.jitter) == ("batch", "fourier", 1.0, 2)
    assert rec.iterations == 150 and rec.threshold_factor == 0
    assert rec.num_batches * rec.batch_size == 128 and rec.resolution is None  # input's size
    # activation step sizes below 8 bits are learned on more images (192)
    low_act = spec("mobilenet_v2", "--reconstruct", "--bits_activation", "6")
    assert low_act.num_batches * low_act.batch_size == 192
    assert spec("mobilenet_v2", "--reconstruct", "--bits_weight", "4").num_batches == 4
    # any activation below 8 bits counts: per layer, or the first and last layers'
    per_layer = spec("mobilenet_v2", "--reconstruct", "--layer_bits", "features.1.*=8,6")
    assert per_layer.num_batches == 6
    assert spec("mobilenet_v2", "--reconstruct", "--keep_first_last", "6").num_batches == 6
    assert spec("mobilenet_v2", "--reconstruct", "--layer_bits", "features.1.*=4").num_batches == 4
    given = spec("mobilenet_v2", "--reconstruct", "--bits_activation", "6", "--dis_num_batch", "2")
    assert given.num_batches == 2
    mixed = spec("mobilenet_v2", "--reconstruct", "--dis_stats", "image", "--dis_jitter", "0")
    assert (mixed.stats, mixed.param, mixed.jitter) == ("image", "fourier", 0)
    assert spec("mobilenet_v2", "--dis_early_stop", "0").threshold_factor == 0


def test_python_api_distils_what_the_cli_distils(monkeypatch):
    """run_one without calib data makes the CLI's images (128 at 224 px, class-conditioned,
    the run's seed for --reconstruct), not DistillConfig()'s 512 at full size."""
    import dfq.data.distill
    from dfq.cli.options import data_spec, pipeline_config
    from dfq.cli.parser import build_parser
    from dfq.data.quantization_data import pipeline_data

    made = []

    def fake_distill(model, config, input_shape, progress, device):
        made.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(dfq.data.distill, "distill", fake_distill)
    argv = ["cls", "--arch", "mobilenet_v2", "--data", "d", "--crop", "224", "--quantize"]
    args = build_parser().parse_args([*argv, "--reconstruct", "--seed", "3"])
    config = pipeline_config(args)
    batches = [(torch.zeros(2, 3, 224, 224), torch.zeros(2))]
    with pytest.raises(RuntimeError, match="stop after"):
        pipeline_data(nn.Identity(), config, batches, progress=False, classifier=True)
    api = made[0]
    assert api == data_spec(args, config).distill
    assert (api.batch_size * api.num_batches, api.resolution) == (128, None)
    assert api.label_loss == 1.0 and api.seed == 3


def test_export_uses_the_same_data_sources_as_cls(tmp_path, capsys):
    """`dfq export` quantizes through dfq.data.quantization_data.pipeline_data: distilled ranges
    work without --data, and real ones without --data are a one-line error."""
    pytest.importorskip("onnx")
    w = str(shared("cifar10_resnet20-12fca82f.th"))
    code, _, err = _run(
        capsys,
        "export",
        "--format",
        "onnx",
        "--arch",
        "cifar_resnet20",
        "--weights",
        w,
        "-o",
        str(tmp_path / "a.onnx"),
        "--calib",
        "8",
    )
    assert code == 2 and "pass them as --data" in err
    code, out, _ = _run(
        capsys,
        "export",
        "--format",
        "onnx",
        "--arch",
        "cifar_resnet20",
        "--weights",
        w,
        "-o",
        str(tmp_path / "b.onnx"),
        "--distill_range",
        "--dis_batch_size",
        "4",
        "--dis_num_batch",
        "1",
        "--dis_iterations",
        "2",
    )
    assert code == 0 and (tmp_path / "b.onnx").exists()


def test_freed_memory_stays_in_the_heap_on_glibc():
    """The CLI's mallopt calls succeed where glibc is the C library (this machine, CI): large
    activations then reuse heap memory instead of page-faulting a fresh mapping each time."""
    import platform

    from dfq.utils.malloc import keep_freed_memory

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc
