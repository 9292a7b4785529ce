"""Each optional dependency, missing, is a one-line user error naming the extra to install
(exit 2), never a ModuleNotFoundError traceback."""

from __future__ import annotations

import sys

import pytest
from conftest import resnet20_args, shared

from dfq.cli import main

R20 = resnet20_args()
DATA = ["--data", str(shared("cifar10_foolbox20.npz")), "--limit", "4", "--quiet"]


@pytest.mark.parametrize(
    "hidden,argv,extra",
    [
        ("onnxruntime", ["cls", *R20, *DATA, "--backend", "ort"], "export"),
        ("onnx", ["cls", *R20, *DATA, "--backend", "ort"], "export"),
        ("ncnn", ["cls", *R20, *DATA, "--backend", "ncnn"], "export"),
        ("onnx", ["export", "--format", "onnx", *R20, "-o", "{tmp}/m.onnx"], "export"),
        ("onnxscript", ["export", "--format", "onnx", *R20, "-o", "{tmp}/m.onnx"], "export"),
        ("pnnx", ["export", "--format", "ncnn", *R20, "-o", "{tmp}/m"], "export"),
        (
            "matplotlib",
            ["cls", *R20, *DATA, "--quantize", "--equalize", "--plot", "{tmp}/plots"],
            "plot",
        ),
        ("timm", ["cls", "--arch", "timm:resnet18", *DATA], "timm"),
        (
            "safetensors.torch",
            ["cls", "--arch", "cifar_resnet20", "--weights", "{tmp}/w.safetensors", *DATA],
            "timm",
        ),
        (
            "google.protobuf.message",
            [
                "export",
                "--format",
                "onnx",
                "--arch",
                "tf_ssdlite_mobilenetv2",
                "--weights",
                "{tmp}/graph.pb",
                "-o",
                "{tmp}/m.onnx",
            ],
            "tf",
        ),
    ],
)
def test_missing_extra_is_a_one_line_error(monkeypatch, capsys, tmp_path, hidden, argv, extra):
    monkeypatch.setitem(sys.modules, hidden, None)  # `import hidden` now raises ImportError
    (tmp_path / "graph.pb").write_bytes(b"")  # read only once protobuf imports
    (tmp_path / "w.safetensors").write_bytes(b"")  # read only once safetensors imports
    hidden = "protobuf" if hidden.startswith("google.") else hidden
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"'{hidden}'" in err and f'pip install "dfq[{extra}]"' in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
