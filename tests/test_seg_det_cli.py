"""`dfq seg` and `dfq det` end to end on a tiny VOCdevkit the tests write (tests/voc_fixture.py),
with checkpoints shaped like the public ones (jfzhang95's .pth.tar dict, qfgaohao's state dict)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from voc_fixture import make_voc

from dfq.cli import main
from dfq.models import build

ROWS = ["FP32", "Original", "+ReLU", "+ReLU+LE", "+BC", "+BC+clip_15", "+ReLU+LE+BC"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_voc(root)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    deeplab = randomize_bn(build("deeplabv3plus_mobilenetv2"), seed=1)
    opt = torch.optim.SGD(deeplab.parameters(), lr=0.01, momentum=0.9)
    # jfzhang95's Saver: a dict with the epoch, state_dict, optimizer and a numpy best_pred
    torch.save(
        {
            "epoch": 3,
            "state_dict": deeplab.state_dict(),
            "optimizer": opt.state_dict(),
            "best_pred": np.float64(0.7081),
        },
        d / "deeplab-mobilenet.pth.tar",
    )
    torch.save(
        randomize_bn(build("ssdlite_mobilenetv2"), seed=2).state_dict(), d / "mb2-ssd-lite.pth"
    )
    torch.save(
        randomize_bn(build("tf_ssdlite_mobilenetv2"), seed=3).state_dict(), d / "tf-ssdlite.pth"
    )
    return {
        "seg": d / "deeplab-mobilenet.pth.tar",
        "det": d / "mb2-ssd-lite.pth",
        "tf": d / "tf-ssdlite.pth",
    }


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 100.0


def test_seg_end_to_end(voc, checkpoints, tmp_path, capsys):
    out_json = tmp_path / "seg.json"
    code, out, _ = _run(
        capsys,
        "seg",
        "--weights",
        checkpoints["seg"],
        "--data",
        voc,
        "--size",
        64,
        "--quantize",
        "--equalize",
        "--correction",
        "--compare",
        "--quiet",
        "--json",
        out_json,
    )
    assert code == 0
    r = json.loads(out_json.read_text())
    assert r["task"] == "seg" and r["arch"] == "deeplabv3plus_mobilenetv2" and r["n"] == 3
    assert r["year"] == "2012" and r["split"] == "val"
    assert _finite(r["miou"]) and _finite(r["fp32_miou"]) and "delta_miou" in r
    assert len(r["detail"]["per_class_iou"]) == 21
    assert r["config"]["equalize"] and r["config"]["correction"] == "bn"
    assert r["equalization"]["pairs"] >= 35 and r["equalization"]["left_alone"]
    assert (
        r["layers"]["decoder.last_conv.0"].get("bias_correction_max") is not None
    )  # moments through the cat
    assert "miou" in out and "left alone" in out


def test_det_end_to_end(voc, checkpoints, tmp_path, capsys):
    out_json = tmp_path / "det.json"
    code, out, _ = _run(
        capsys,
        "det",
        "--weights",
        checkpoints["det"],
        "--data",
        voc,
        "--limit",
        2,
        "--quantize",
        "--relu",
        "--equalize",
        "--correction",
        "--per_channel",
        "--compare",
        "--quiet",
        "--json",
        out_json,
    )
    assert code == 0
    r = json.loads(out_json.read_text())
    assert r["task"] == "det" and r["arch"] == "ssdlite_mobilenetv2" and r["n"] == 2
    assert r["year"] == "2007" and r["split"] == "test"
    for k in ("map07", "map12", "fp32_map07", "fp32_map12"):
        assert _finite(r[k])
    assert r["config"]["input_mean"] == pytest.approx([127 / 255] * 3)  # qfgaohao's (x - 127) / 128
    assert r["equalization"]["pairs"] >= 50
    assert "map07" in out


def test_det_runs_a_tf_detector_with_its_own_processing(voc, checkpoints, tmp_path, capsys):
    """The TF SSD's InputConfig names its evaluation (tasks/tf_ssd): 300x300, (0.5, 0.5)
    normalisation, 1917 anchors, scored on the class it has (person) only."""
    persons = tmp_path / "voc"  # the fixture's only person is difficult: make it count
    shutil.copytree(voc, persons)
    xml = persons / "VOCdevkit" / "VOC2007" / "Annotations" / "2008_000001.xml"
    xml.write_text(xml.read_text().replace("<difficult>1</difficult>", "<difficult>0</difficult>"))
    out_json = tmp_path / "tf.json"
    code, out, err = _run(
        capsys,
        "det",
        "--arch",
        "tf_ssdlite_mobilenetv2",
        "--weights",
        checkpoints["tf"],
        "--data",
        persons,
        "--quantize",
        "--equalize",
        "--correction",
        "--compare",
        "--quiet",
        "--json",
        out_json,
    )
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["arch"] == "tf_ssdlite_mobilenetv2" and r["classes"] == ["person"] and r["n"] == 3
    assert set(r["detail"]["per_class_ap"]) <= {"person"}
    assert r["config"]["input_mean"] == [0.5] * 3 and r["config"]["input_std"] == [0.5] * 3
    assert _finite(r["map07"]) and _finite(r["fp32_map07"])
    code, _, err = _run(capsys, "seg", "--arch", "tf_ssdlite_mobilenetv2", "--data", voc, "--quiet")
    assert code == 2 and "evaluated by `dfq det`" in err


def test_seg_ablation_rows(voc, tmp_path, capsys):
    code, out, _ = _run(
        capsys,
        "seg",
        "--data",
        voc,
        "--size",
        33,
        "--limit",
        2,
        "--ablation",
        "--quiet",
        "--json",
        tmp_path / "a.json",
    )
    assert code == 0
    r = json.loads((tmp_path / "a.json").read_text())
    assert [row["name"] for row in r["rows"]] == ROWS
    assert all(_finite(row["miou"]) and "delta_miou" in row for row in r["rows"])
    assert r["rows"][0]["delta_miou"] == 0
    assert "| +ReLU+LE+BC" in out and "Δmiou vs FP32" in out


def test_det_ablation_rows(voc, tmp_path, capsys):
    code, out, _ = _run(
        capsys,
        "det",
        "--data",
        voc,
        "--year",
        "2012",
        "--split",
        "val",
        "--limit",
        1,
        "--ablation",
        "--quiet",
        "--json",
        tmp_path / "a.json",
    )
    assert code == 0
    r = json.loads((tmp_path / "a.json").read_text())
    assert [row["name"] for row in r["rows"]] == ROWS
    assert all(_finite(row["map07"]) and _finite(row["map12"]) for row in r["rows"])
    assert "Δmap12 vs FP32" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["seg", "--data", "{voc}", "--year", "2010"], "No VOCdevkit/VOC2010"),
        (["det", "--data", "{voc}", "--split", "train"], "does not exist"),
        (["det", "--data", "{voc}", "--arch", "no_such_net"], "Unknown architecture"),
        (["seg", "--data", "{voc}", "--weights", "{det_ckpt}"], "does not fit"),
    ],
)
def test_bad_input_exits_2_with_one_line(voc, checkpoints, capsys, argv, needle):
    argv = [a.format(voc=voc, det_ckpt=checkpoints["det"]) for a in argv]
    code, _, err = _run(capsys, *argv, "--quantize", "--quiet")
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,backend", [("seg", "ort"), ("seg", "ncnn"), ("det", "ort"), ("det", "ncnn")]
)
def test_seg_det_int8_runtimes_equal_their_simulation(
    voc, checkpoints, tmp_path, capsys, task, backend
):
    """`dfq seg|det --backend`: the exported int8 model in its runtime scores as its simulation."""
    pytest.importorskip("onnxruntime" if backend == "ort" else "ncnn")
    out_json = tmp_path / f"{task}_{backend}.json"
    code, out, err = _run(
        capsys,
        task,
        "--weights",
        checkpoints[task],
        "--data",
        voc,
        "--limit",
        2,
        *(["--size", 64] if task == "seg" else []),
        "--quantize",
        "--relu",
        "--equalize",
        "--correction",
        "--backend",
        backend,
        "--quiet",
        "--json",
        out_json,
        "--export_dir",
        tmp_path / "export",
    )
    assert code == 0, err
    r = json.loads(out_json.read_text())
    metric = "miou" if task == "seg" else "map07"
    assert r["backend"] == backend and _finite(r[metric])
    assert abs(r[f"delta_{metric}_vs_sim"]) <= 1.0
