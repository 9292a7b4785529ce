"""Each optional dependency, missing, is a one-line user error naming the extra to install
(exit 2), never a ModuleNotFoundError traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import resnet20_args, shared

from dfq import runtimes
from dfq.cli import main
from dfq.errors import DfqError

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


@pytest.mark.parametrize(
    "runtime,hidden",
    [(r.name, m) for r in runtimes.runtimes() for m in r.runtime_modules],
)
def test_each_runtime_names_its_extra_when_a_module_is_missing(monkeypatch, runtime, hidden):
    """Every registered runtime, each of its modules missing: one line naming its extra."""
    monkeypatch.setitem(sys.modules, hidden, None)
    profile = runtimes.profile(runtime)
    with pytest.raises(DfqError) as err:
        profile.check_runtime()
    text = str(err.value)
    assert f"'{hidden}'" in text and f'pip install "dfq[{profile.extra}]"' in text
    assert len(text.splitlines()) == 1


def test_import_dfq_does_not_import_runtimes():
    """Not even the registry, every runtime package and its modules import a runtime's own
    Python packages (onnx, onnxruntime, ncnn, pnnx ...): they load when a run needs them."""
    code = (
        "import sys, dfq, dfq.runtimes, dfq.cli, dfq.app.runs; from dfq import runtimes; "
        "[__import__(f'{type(r).__module__}.{m}') for r in runtimes.runtimes() "
        "for m in ('profile', 'export', 'runner')]; "
        "mods = {m.split('.')[0] for r in runtimes.runtimes() for m in r.runtime_modules}; "
        "assert {'onnx', 'onnxruntime', 'ncnn', 'pnnx'} <= mods; "
        "print(sorted(mods & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
