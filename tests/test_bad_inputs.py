"""Every input a user can get wrong: a one-line error naming the problem and the fix, exit 2,
no traceback (unless --debug). Images that fail to decode FAIL the run (dfq never silently
skips images: an accuracy on a silently different set is garbage)."""

import math

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from torch import nn

from dfq import DfqError, PipelineConfig, QuantConfig, quantize_model
from dfq.cli import main

NET = """import math, torch
from torch import nn
def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
def untraceable():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                return y.mean((2, 3))
            return y.amax((2, 3))
    return Net()
def nan_weights():
    m = build()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    return m
def inf_bn():
    m = build()
    m[1].running_var[1] = float("inf")
    return m
def training():
    return build().train()
"""


@pytest.fixture
def env(tmp_path):
    """A user model file and a tiny decoded-image .npz (4 CIFAR-sized images)."""
    (tmp_path / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "imgs.npz",
        images=rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
        labels=np.arange(4),
    )
    return tmp_path


def _cls(capsys, *argv):
    code = main(["cls", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _model(env, fn):
    return [
        "--model",
        f"{env / 'net.py'}:{fn}",
        "--data",
        str(env / "imgs.npz"),
        "--resize",
        "0",
        "--crop",
        "0",
        "--quiet",
    ]


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dfq: error:") and "Fix:" in err or "use" in err or "check" in err, err
    for n in needles:
        assert n in err, (n, err)


def test_untraceable_model_names_the_line(env, capsys):
    code, _, err = _cls(capsys, *_model(env, "untraceable"), "--quantize")
    _one_line_error(code, err, "cannot trace", "net.py", "if y.sum() > 0", "torch.fx.wrap")


def test_debug_shows_the_traceback(env):
    with pytest.raises(DfqError):
        main(["--debug", "cls", *_model(env, "untraceable"), "--quantize"])


@pytest.mark.parametrize(
    "fn,needle",
    [("nan_weights", "0.weight has 1 NaN/Inf"), ("inf_bn", "1.running_var has 1 NaN/Inf")],
)
def test_nan_inf_in_weights_or_bn_statistics(env, capsys, fn, needle):
    code, _, err = _cls(capsys, *_model(env, fn), "--quantize")
    _one_line_error(code, err, needle, "checkpoint")


def test_nan_in_weights_via_the_api():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    m[1].running_mean[0] = math.nan
    with pytest.raises(DfqError, match="running_mean has 1 NaN/Inf"):
        quantize_model(m, PipelineConfig())


def test_training_mode_model_is_evaluated_in_eval_mode_and_says_so(env, capsys, caplog):
    code, out, err = _cls(capsys, *_model(env, "training"), "--quantize")
    assert code == 0 and "top1" in out
    assert "training mode" in caplog.text and "eval mode" in caplog.text


def test_training_mode_via_the_api_is_reported_and_left_alone(caplog):
    torch.manual_seed(0)
    m = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
    ).train()
    res = quantize_model(m, PipelineConfig(quantize=False))
    assert m.training and all(x.training for x in m.modules())
    assert "training mode" in caplog.text
    x = torch.randn(2, 3, 8, 8)
    m.eval()
    assert torch.allclose(
        res.model(x), m(x), atol=1e-5
    )  # the eval-mode function (BN stats, no dropout)


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--bits_weight", "1"], ["--bits_weight 1 is out of range", "2..16"]),
        (["--bits_activation", "17"], ["--bits_activation 17 is out of range"]),
        (["--bits_bias", "12"], ["--bits_bias 12 is not supported", "8, 16 or 32"]),
        (["--absorption"], ["--absorption needs --equalize", "add --equalize"]),
        (["--clip_weight", "-1"], ["--clip_weight -1.0 must be positive"]),
        (["--range_percentile", "30"], ["--range_percentile 30.0 must be in (50, 100]"]),
        (
            ["--target", "ort", "--bits_activation", "16"],
            ["--target ort runs int8", "--bits_activation <= 8"],
        ),
        (
            ["--target", "ncnn", "--asymmetric_weight"],
            ["symmetric int8 weights", "drop asymmetric weights (--asymmetric_weight)"],
        ),
    ],
)
def test_out_of_range_and_contradictory_switches(env, capsys, extra, needles):
    code, _, err = _cls(capsys, *_model(env, "build"), "--quantize", *extra)
    _one_line_error(code, err, *needles)


def test_bit_widths_out_of_range_via_the_api():
    for kw in ({"bits_weight": 17}, {"bits_activation": 1}, {"bits_bias": 64}):
        with pytest.raises(DfqError):
            QuantConfig(**kw)


def test_unknown_arch_suggests_close_names(env, capsys):
    code, _, err = _cls(capsys, "--arch", "mobilenet_v9", "--data", str(env / "imgs.npz"))
    _one_line_error(code, err, "Unknown architecture 'mobilenet_v9'", "mobilenet_v2")


def test_weights_missing_corrupt_or_for_another_architecture(env, capsys):
    base = _model(env, "build")
    code, _, err = _cls(capsys, *base, "--weights", str(env / "nope.pth"))
    _one_line_error(code, err, "nope.pth does not exist", "--weights")
    (env / "bad.pth").write_bytes(b"\x00garbage")
    code, _, err = _cls(capsys, *base, "--weights", str(env / "bad.pth"))
    _one_line_error(code, err, "corrupt or not a torch checkpoint", "re-download")
    other = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8, 10),
        nn.Linear(10, 2),
    )
    torch.save(other.state_dict(), env / "other.pth")
    code, _, err = _cls(capsys, *base, "--weights", str(env / "other.pth"))
    # the first mismatched keys are named
    _one_line_error(
        code,
        err,
        "does not fit",
        "unexpected ['4.weight', '4.bias']",
        "shape differs for ['0.weight', '0.bias', '1.weight']",
        "--arch matches",
    )
    torch.save({"epoch": 3}, env / "nosd.pth")
    code, _, err = _cls(capsys, *base, "--weights", str(env / "nosd.pth"))
    _one_line_error(code, err, "holds no state dict")


def test_data_path_missing_empty_or_unknown(env, capsys):
    base = ["--model", f"{env / 'net.py'}:build", "--quantize"]
    code, _, err = _cls(capsys, *base, "--data", str(env / "nowhere"))
    _one_line_error(code, err, "does not exist", "--data")
    (env / "empty").mkdir()
    code, _, err = _cls(capsys, *base, "--data", str(env / "empty"))
    _one_line_error(code, err, "holds no images", "--data")
    (env / "x.csv").write_text("1,2,3")
    code, _, err = _cls(capsys, *base, "--data", str(env / "x.csv"))
    _one_line_error(code, err, "is not a folder, .npz or foolbox .whl")
    (env / "notnpz.npz").write_bytes(b"junk")
    code, _, err = _cls(capsys, *base, "--data", str(env / "notnpz.npz"))
    _one_line_error(code, err, "not a readable .npz")
    np.savez(env / "keys.npz", foo=np.zeros(3))
    code, _, err = _cls(capsys, *base, "--data", str(env / "keys.npz"))
    _one_line_error(code, err, "not a known image format")


def test_undecodable_images_fail_the_run(env, capsys):
    """Consistent policy: fail (never skip), naming the image, in every source format."""
    base = ["--model", f"{env / 'net.py'}:build", "--quiet", "--resize", "0", "--crop", "0"]
    folder = env / "val" / "cat"
    folder.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "ok.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, _, err = _cls(capsys, *base, "--data", str(env / "val"))
    _one_line_error(code, err, "broken.jpg could not be decoded", "does not silently skip")
    jpeg = np.frombuffer(b"\xff\xd8\xffjunkjunk", np.uint8)
    np.savez(env / "j.npz", jpeg=jpeg, offsets=np.array([0, len(jpeg)]), labels=np.array([0]))
    code, _, err = _cls(capsys, *base, "--data", str(env / "j.npz"))
    _one_line_error(code, err, "j.npz image 0 could not be decoded")


def test_model_spec_errors(env, capsys):
    code, _, err = _cls(capsys, "--model", "no_colon", "--data", str(env / "imgs.npz"))
    _one_line_error(code, err, "is not of the form")
    code, _, err = _cls(
        capsys, "--model", f"{env / 'net.py'}:missing", "--data", str(env / "imgs.npz")
    )
    _one_line_error(code, err, "has no callable 'missing'")
    code, _, err = _cls(
        capsys, "--arch", "cifar_resnet20", "--model", "a.py:b", "--data", str(env / "imgs.npz")
    )
    _one_line_error(code, err, "exactly one of --arch and --model")


class _FailsOnSecondBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 21, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("second batch")
        return self.conv(x)


def test_an_evaluation_that_fails_gives_the_model_back_in_training_mode():
    from dfq.tasks.classification import logits_per_batch
    from dfq.tasks.segmentation import confusion_per_batch

    batches = [(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))] * 3
    for run in (logits_per_batch, confusion_per_batch):
        m = _FailsOnSecondBatch().train()
        with pytest.raises(RuntimeError, match="second batch"):
            run(m, batches)
        assert m.calls == 2 and m.training and m.conv.training


@pytest.mark.parametrize("size", [(1, 3, 96, 96), (96, 96), (3, 0, 96), (3.0, 96, 96)])
def test_input_size_must_be_one_images_shape(size):
    """A batch dimension was once silently made (1, 1, 3, 96, 96) in the static-shape trace."""
    with pytest.raises(DfqError, match=r"`input_size`=.* is not \(C, H, W\)") as err:
        PipelineConfig(input_size=size)
    if len(size) == 4:
        assert "batch dimension" in str(err.value) and "(3, 96, 96)" in str(err.value)
    assert PipelineConfig(input_size=[3, 96, 96]).input_size == (3, 96, 96)
