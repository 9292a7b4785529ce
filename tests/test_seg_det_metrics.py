"""Segmentation and detection metrics against hand-computed cases, and evaluate() on a tiny VOC
folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from voc_fixture import OBJECTS, SEG_LABELS, SIZES, make_voc

from dfq.errors import DfqError
from dfq.tasks import detection as det
from dfq.tasks import segmentation as seg
from dfq.tasks.voc import VOC_CLASSES

# ---------------------------------------------------------------- segmentation


def test_confusion_matrix_counts_pixels_and_ignores_255():
    target = torch.tensor([[0, 0, 1, 1], [2, 255, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 2]])
    cm = seg.confusion_matrix(target, pred, 3)
    # rows: truth, columns: prediction; the two 255 pixels are not counted
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]


def test_iou_per_class_and_mean_skip_absent_classes():
    cm = torch.tensor([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    iou = seg.iou_per_class(cm)
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (3 + 3 - 2); class 2: 0 / (1 + 1 - 0);
    # class 3 never occurs
    assert iou[:3] == pytest.approx([1 / 3, 1 / 2, 0.0])
    assert math.isnan(iou[3])
    assert seg.mean_iou(cm) == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)


class ConstantSeg(nn.Module):
    """Predicts one class everywhere."""

    def __init__(self, label: int, num_classes: int = 21):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_classes), requires_grad=False)
        self.logits.data[label] = 1.0

    def forward(self, x):
        return self.logits[None, :, None, None].expand(x.shape[0], -1, x.shape[2], x.shape[3])


def test_segmentation_evaluate_on_tiny_voc(tmp_path):
    masks = make_voc(tmp_path)
    loader = DataLoader(seg.VOCSegmentationVal(tmp_path, crop_size=32), batch_size=2)
    out = seg.evaluate(ConstantSeg(0), loader)
    # crop_size=32 equals every short side: no resize, only the centred crop of the long side
    crops = {"2008_000001": (slice(None), slice(4, 36)), "2008_000002": (slice(8, 40), slice(None))}
    background = objects = 0
    per_label = {}
    for image_id, mask in masks.items():
        m = mask[crops.get(image_id, (slice(None), slice(None)))]
        background += int((m == 0).sum())
        per_label[SEG_LABELS[image_id]] = int((m == SEG_LABELS[image_id]).sum())
        objects += per_label[SEG_LABELS[image_id]]
    # everything is predicted background: IoU(bg) = bg / (bg + object pixels), the object classes 0
    assert out["n"] == 3
    assert out["per_class_iou"][0] == pytest.approx(100 * background / (background + objects))
    assert all(out["per_class_iou"][k] == 0.0 for k in per_label)
    assert sum(v is None for v in out["per_class_iou"]) == 21 - 1 - len(per_label)
    assert out["miou"] == pytest.approx(out["per_class_iou"][0] / (1 + len(per_label)))


def test_missing_split_is_a_clear_error(tmp_path):
    make_voc(tmp_path)
    with pytest.raises(DfqError, match="train.txt"):
        seg.VOCSegmentationVal(tmp_path, split="train")
    with pytest.raises(DfqError, match="VOCdevkit/VOC2010"):
        seg.VOCSegmentationVal(tmp_path, year="2010")


# ---------------------------------------------------------------- average precision


def test_ap_07_and_12_differ_on_a_known_curve():
    # 4 ground-truth boxes; detections by falling score: TP, FP, TP, FP, FP (one box never found)
    hits = np.array([1, 0, 1, 0, 0], dtype=float)
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    precision, recall = tp / (tp + fp), tp / 4  # [1, .5, .667, .5, .4], [.25, .25, .5, .5, .5]
    # VOC12: area under the envelope = 0.25 * 1 + 0.25 * 2/3
    assert det.average_precision(precision, recall, use_07_metric=False) == pytest.approx(5 / 12)
    # VOC07: t = 0, .1, .2 -> 1; t = .3, .4, .5 -> 2/3; t = .6 ... 1 -> 0
    assert det.average_precision(precision, recall, use_07_metric=True) == pytest.approx(5 / 11)


def test_ap_perfect_empty_and_the_07_threshold_quirk():
    for use_07 in (True, False):
        assert det.average_precision([1.0, 1.0], [0.5, 1.0], use_07) == pytest.approx(1.0)
        assert det.average_precision([], [], use_07) == 0.0
    # np.arange(0, 1.1, 0.1)[3] is 0.30000000000000004 > 0.3: recall 0.3 only reaches 3 of 11 points
    assert det.average_precision([1.0], [0.3], use_07_metric=True) == pytest.approx(3 / 11)
    assert det.average_precision([1.0], [0.3], use_07_metric=False) == pytest.approx(0.3)


def _target(boxes, labels, difficult):
    return {
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.array(labels, dtype=np.int64),
        "difficult": np.array(difficult, dtype=bool),
    }


def _dets(rows):
    """rows of (score, label, box)"""
    return {
        "boxes": torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([r[0] for r in rows], dtype=torch.float32),
        "labels": torch.tensor([r[1] for r in rows], dtype=torch.int64),
    }


def test_matching_duplicates_difficult_and_threshold():
    targets = [
        _target([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [False, True]),
        _target([[0, 0, 10, 10]], [2], [False]),
    ]
    detections = [
        _dets([
            (0.9, 1, [0, 0, 10, 10]),     # TP
            (0.8, 1, [0, 0, 10, 10]),     # duplicate of a taken box: FP
            (0.7, 1, [20, 20, 30, 30]),   # on the difficult box: ignored
            (0.6, 1, [0, 0, 10, 20]),     # IoU exactly 0.5 (minus eps): not > 0.5, FP
        ]),
        _dets([(0.95, 1, [0, 0, 10, 10])]),  # no class-1 box in this image: FP, and the best score
    ]  # fmt: skip
    precision, recall = det.precision_recall(detections, targets, label=1)
    assert precision.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.25])
    assert recall.tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])  # one non-difficult class-1 box
    assert det.precision_recall(detections, targets, label=3) is None
    out = det.voc_map(detections, targets)
    assert set(out["per_class_ap"]) == {
        "aeroplane",
        "bicycle",
    }  # classes 1 and 2, the only ones with boxes
    assert out["per_class_ap"]["bicycle"] == {"ap07": 0.0, "ap12": 0.0}  # a box, no detection
    assert out["per_class_ap"]["aeroplane"]["ap12"] == pytest.approx(50.0)
    assert out["map12"] == pytest.approx(25.0)
    assert out["n"] == 2


# ---------------------------------------------------------------- priors, decoding, NMS


def test_priors_match_the_qfgaohao_config():
    priors = det.ssd_priors()
    assert priors.shape == (3000, 4)  # (19^2 + 10^2 + 5^2 + 3^2 + 2^2 + 1) * 6
    c = 0.5 / (300 / 16)
    small, large, r2 = 60 / 300, math.sqrt(60 * 105) / 300, math.sqrt(2)
    expected = [
        [c, c, small, small],
        [c, c, large, large],
        [c, c, small * r2, small / r2],
        [c, c, small / r2, small * r2],
    ]
    np.testing.assert_allclose(priors[:4], expected, rtol=1e-6)
    assert priors[6, 0].item() == pytest.approx(1.5 / (300 / 16))  # next cell to the right
    # the single 1x1 cell: tall box of ratio 3 clamped to the image
    assert priors[-1].tolist() == pytest.approx([0.5, 0.5, 0.95 / math.sqrt(3), 1.0])


def _encode(boxes: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Corner boxes -> SSD locations for these priors (the inverse of decode_boxes)."""
    centers, sizes = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    return torch.cat(
        [(centers - priors[:, :2]) / priors[:, 2:] / 0.1, torch.log(sizes / priors[:, 2:]) / 0.2], 1
    )


def test_decode_boxes():
    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    np.testing.assert_allclose(
        det.decode_boxes(torch.zeros(1, 4), priors), [[0.4, 0.3, 0.6, 0.7]], rtol=1e-6
    )
    # centre moves by loc * 0.1 * prior size, size scales by exp(loc * 0.2)
    loc = torch.tensor([[1.0, -2.0, 5 * math.log(2), 0.0]])
    np.testing.assert_allclose(det.decode_boxes(loc, priors), [[0.32, 0.22, 0.72, 0.62]], rtol=1e-6)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    np.testing.assert_allclose(det.decode_boxes(_encode(boxes, priors), priors), boxes, rtol=1e-6)


def _oracle_outputs(targets, priors, num_classes=21):
    """Confidences/locations that put each ground-truth box on its best prior, background
    elsewhere."""
    corner = det.decode_boxes(torch.zeros_like(priors), priors)
    conf = torch.zeros(len(targets), len(priors), num_classes)
    conf[..., 0] = 10.0
    loc = torch.zeros(len(targets), len(priors), 4)
    for i, t in enumerate(targets):
        w, h = t["size"]
        rel = torch.from_numpy(t["boxes"]) / torch.tensor([w, h, w, h])
        for box, label in zip(rel, t["labels"].tolist()):
            best = int(torch.argmax(torch.from_numpy(det.box_iou(box.numpy(), corner.numpy()))))
            conf[i, best] = 0.0
            conf[i, best, label] = 10.0
            loc[i, best] = _encode(box[None], priors[best : best + 1])[0]
    return conf, loc


def test_postprocess_recovers_boxes_and_suppresses_overlaps():
    priors = det.ssd_priors()
    target = {
        "size": (200, 100),
        "boxes": np.array([[20, 10, 120, 90]], np.float32),
        "labels": np.array([7]),
    }
    conf, loc = _oracle_outputs([target], priors)
    out = det.postprocess(conf, loc, priors, [target["size"]])[0]
    assert out["labels"].tolist() == [7]
    np.testing.assert_allclose(out["boxes"], [[20, 10, 120, 90]], atol=1e-3)

    # three priors: the first two predict the same box, the third a distant one
    priors = torch.tensor([[0.35, 0.5, 0.5, 0.8], [0.35, 0.5, 0.5, 0.8], [0.8, 0.8, 0.1, 0.1]])
    logits = torch.full((1, 3, 21), -10.0)
    logits[0, 0, 7], logits[0, 1, 7], logits[0, 1, 3], logits[0, 2, 7] = 5.0, 4.0, 4.0, 3.0
    out = det.postprocess(logits, torch.zeros(1, 3, 4), priors, [(100, 100)])[0]
    # class 7: prior 1 overlaps prior 0 (IoU 1 > 0.45) and goes; prior 2 stays. Class 3 is separate.
    assert out["labels"].tolist() == [3, 7, 7]
    np.testing.assert_allclose(
        out["boxes"], [[10, 10, 60, 90], [10, 10, 60, 90], [75, 75, 85, 85]], rtol=1e-5
    )
    assert out["scores"][1] > out["scores"][2]
    capped = det.postprocess(logits, torch.zeros(1, 3, 4), priors, [(100, 100)], candidate_size=1)[
        0
    ]
    assert capped["labels"].tolist() == [3, 7]


def test_preprocess_is_qfgaohao_normalisation():
    from PIL import Image

    x = det.preprocess(Image.new("RGB", (500, 375), (127, 255, 0)))
    assert x.shape == (3, 300, 300)
    assert x[:, 0, 0].tolist() == pytest.approx([0.0, 1.0, -127 / 128])


class Replay(nn.Module):
    """Returns queued outputs in order: stands in for a network whose answers we chose."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, x):
        conf, loc = self.outputs.pop(0)
        assert conf.shape[0] == x.shape[0]
        return conf, loc


@pytest.mark.parametrize("year,split", [("2007", "test"), ("2012", "val")])
def test_detection_evaluate_on_tiny_voc(tmp_path, year, split):
    make_voc(tmp_path)
    dataset = det.VOCDetectionEval(tmp_path, year=year, split=split)
    targets = [dataset[i][1] for i in range(len(dataset))]
    assert [t["id"] for t in targets] == list(SIZES)
    assert [t["difficult"].tolist() for t in targets] == [
        [d == 1 for *_, d in OBJECTS[k]] for k in SIZES
    ]
    loader = DataLoader(dataset, batch_size=2, collate_fn=det.collate)
    priors = det.ssd_priors()
    outputs = [_oracle_outputs(targets[:2], priors), _oracle_outputs(targets[2:], priors)]
    out = det.evaluate(Replay(outputs), loader)
    # every box found exactly; the only person box is difficult, so person has no AP
    assert out["n"] == 3
    assert set(out["per_class_ap"]) == {"dog", "cat", "car"}
    assert out["map07"] == pytest.approx(100.0)
    assert out["map12"] == pytest.approx(100.0)


def test_detection_rejects_wrong_prior_count(tmp_path):
    make_voc(tmp_path)
    loader = DataLoader(det.VOCDetectionEval(tmp_path), batch_size=3, collate_fn=det.collate)
    wrong = (torch.zeros(3, 100, 21), torch.zeros(3, 100, 4))
    with pytest.raises(DfqError, match="3000 priors"):
        det.evaluate(Replay([wrong]), loader)


def test_voc_classes():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def test_a_custom_split_is_read_from_its_own_list_file(tmp_path):
    """A subset list such as ImageSets/Main/val500.txt works (torchvision's VOC classes accept
    only the standard names), and a missing one names the lists present (the CLI's exit 2)."""
    import torchvision

    make_voc(tmp_path)
    ids = sorted(SIZES)[:2]
    for year, kind in (("2012", "Segmentation"), ("2007", "Main")):
        lists = tmp_path / "VOCdevkit" / f"VOC{year}" / "ImageSets" / kind
        (lists / "mine500.txt").write_text("\n".join(ids) + "\n")
    subset = seg.VOCSegmentationVal(tmp_path, split="mine500", crop_size=32)
    full = seg.VOCSegmentationVal(tmp_path, split="val", crop_size=32)
    order = list(SIZES)
    assert len(subset) == 2
    for i, image_id in enumerate(ids):
        for a, b in zip(subset[i], full[order.index(image_id)]):
            assert torch.equal(a, b)
    boxes = det.VOCDetectionEval(tmp_path, split="mine500")
    assert [boxes[i][1]["id"] for i in range(len(boxes))] == ids
    # the annotations read as torchvision's parser reads them
    tv = torchvision.datasets.VOCDetection(str(tmp_path), year="2007", image_set="test")
    for i, image_id in enumerate(ids):
        j = order.index(image_id)
        want = det.VOCDetectionEval._target(tv[j][1]["annotation"], tv.annotations[j])
        got = boxes[i][1]
        assert want.keys() == got.keys() and want["size"] == got["size"]
        for k in ("boxes", "labels", "difficult"):
            np.testing.assert_array_equal(want[k], got[k])
    with pytest.raises(DfqError, match=r"mine500.*test") as err:
        det.VOCDetectionEval(tmp_path, split="val500")
    assert "val500.txt" in str(err.value)
