"""PASCAL VOC detection for SSD models: data, priors, box decoding, NMS, VOC07/VOC12 AP, evaluate().

Everything after the network runs in float here, outside the traced graph, and follows
qfgaohao/pytorch-ssd's evaluation (`eval_ssd.py`, `Predictor`, `box_utils`), so its published
figure for the MobileNetV2 SSD-Lite (68.6% mAP, VOC07 test, 11-point metric) is the reference:
- input: resize to 300x300 (bilinear without antialiasing, like cv2.INTER_LINEAR, rounded to
  uint8), then (x - 127) / 128, RGB;
- output: softmax; per class, scores > 0.01, the 200 best, hard NMS at IoU 0.45; boxes scaled to
  the image size in pixels;
- ground truth: Annotation boxes minus 1 (Matlab to 0-based), with their `difficult` flags;
- matching: a detection is a true positive when its best IoU (no +1 pixel convention) with a
  ground-truth box of its class in its image is > 0.5 and that box is not yet taken; when the
  best box is difficult the detection is ignored; difficult boxes are not counted in recall.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from dfq.errors import DfqError
from dfq.models.registry import InputConfig
from dfq.tasks.base import DataOptions, EvalData, MetricScore, Task, evaluating, voc_eval_data
from dfq.tasks.voc import VOC_CLASSES, open_voc

IMAGE_SIZE = 300
YEAR, SPLIT = "2007", "test"
IMAGE_MEAN = 127.0
IMAGE_STD = 128.0
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2


@dataclass(frozen=True)
class PriorSpec:
    """One SSD source layer: a feature_map x feature_map grid with cells `shrinkage` pixels
    apart."""

    feature_map: int
    shrinkage: int
    min_size: float
    max_size: float
    aspect_ratios: tuple[int, ...]


# qfgaohao's mobilenetv1_ssd_config, which its MobileNetV2 SSD-Lite uses: 6 anchors per cell.
SSDLITE_SPECS = (
    PriorSpec(19, 16, 60, 105, (2, 3)),
    PriorSpec(10, 32, 105, 150, (2, 3)),
    PriorSpec(5, 64, 150, 195, (2, 3)),
    PriorSpec(3, 100, 195, 240, (2, 3)),
    PriorSpec(2, 150, 240, 285, (2, 3)),
    PriorSpec(1, 300, 285, 330, (2, 3)),
)


def ssd_priors(
    specs: tuple[PriorSpec, ...] = SSDLITE_SPECS, image_size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Prior boxes (P, 4) as (cx, cy, w, h) relative to the image, clamped to [0, 1].

    Order: source layer, then row, column, then anchor (small square, large square, and a
    wide/tall pair per aspect ratio), which is the order of the network's flattened heads.
    """
    priors = []
    for spec in specs:
        scale = image_size / spec.shrinkage
        small = spec.min_size / image_size
        large = math.sqrt(spec.min_size * spec.max_size) / image_size
        for row, col in itertools.product(range(spec.feature_map), repeat=2):
            cx, cy = (col + 0.5) / scale, (row + 0.5) / scale
            priors += [[cx, cy, small, small], [cx, cy, large, large]]
            for ratio in spec.aspect_ratios:
                r = math.sqrt(ratio)
                priors += [[cx, cy, small * r, small / r], [cx, cy, small / r, small * r]]
    return torch.tensor(priors).clamp_(0.0, 1.0)


def decode_boxes(
    locations: torch.Tensor,
    priors: torch.Tensor,
    center_variance: float = CENTER_VARIANCE,
    size_variance: float = SIZE_VARIANCE,
) -> torch.Tensor:
    """SSD regression outputs (..., P, 4) to corner boxes (x1, y1, x2, y2) relative to the image."""
    centers = locations[..., :2] * center_variance * priors[..., 2:] + priors[..., :2]
    sizes = torch.exp(locations[..., 2:] * size_variance) * priors[..., 2:]
    return torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1)


def resize_like_cv2(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB PIL image -> (3, size, size) float tensor of uint8 values, as cv2.resize(INTER_LINEAR)
    on uint8: half-pixel bilinear, no antialiasing, aspect not kept, rounded back to uint8."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
    x = F.interpolate(
        x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )[0]
    return x.round().clamp(0, 255)


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """RGB PIL image -> normalised (3, size, size) tensor, as qfgaohao's PredictionTransform."""
    return (resize_like_cv2(image, size) - IMAGE_MEAN) / IMAGE_STD


class VOCDetectionEval(Dataset):
    """Images of a VOC detection split, preprocessed, with their ground truth for scoring.

    Each item is (image tensor, target) with target = {"id", "size": (w, h), "boxes": (n, 4)
    float32 0-based pixels, "labels": (n,) int64 class ids (1..20), "difficult": (n,) bool}.
    """

    def __init__(
        self, root: str | Path, year: str = "2007", split: str = "test", size: int = IMAGE_SIZE
    ):
        self.voc = open_voc(root, year, split, segmentation=False)
        self.size = size

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        image, ann = self.voc[index]
        return preprocess(image, self.size), self._target(ann, self.voc.targets[index])

    @staticmethod
    def _target(ann: dict, path: str) -> dict:
        boxes, labels, difficult = [], [], []
        for obj in ann.get("object", []):
            name = obj["name"].strip().lower()
            if name not in VOC_CLASSES[1:]:
                raise DfqError(
                    f"Unknown class '{name}' in '{path}'.", f"VOC classes are {VOC_CLASSES[1:]}"
                )
            box = obj["bndbox"]
            boxes.append([float(box[k]) - 1.0 for k in ("xmin", "ymin", "xmax", "ymax")])
            labels.append(VOC_CLASSES.index(name))
            difficult.append(bool(int(obj.get("difficult") or 0)))
        return {
            "id": Path(path).stem,
            "size": (int(ann["size"]["width"]), int(ann["size"]["height"])),
            "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.array(labels, dtype=np.int64),
            "difficult": np.array(difficult, dtype=bool),
        }


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """DataLoader collate_fn: stack the images, keep the per-image targets as a list."""
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


def postprocess(
    confidences: torch.Tensor,
    locations: torch.Tensor,
    priors: torch.Tensor,
    image_sizes: list[tuple[int, int]],
    prob_threshold: float = 0.01,
    iou_threshold: float = 0.45,
    candidate_size: int = 200,
) -> list[dict]:
    """Raw SSD outputs (N, P, K), (N, P, 4) -> per image {"boxes" (pixels), "scores", "labels"}."""
    from torchvision.ops import nms

    probs = F.softmax(confidences.float(), dim=2)
    boxes = decode_boxes(locations.float(), priors)
    results = []
    for img_probs, img_boxes, (w, h) in zip(probs, boxes, image_sizes):
        keep_boxes, keep_scores, keep_labels = [], [], []
        for label in range(1, img_probs.shape[1]):
            scores = img_probs[:, label]
            mask = scores > prob_threshold
            scores, cand = scores[mask], img_boxes[mask]
            top = scores.argsort(descending=True, stable=True)[:candidate_size]
            scores, cand = scores[top], cand[top]
            kept = nms(cand, scores, iou_threshold)
            keep_boxes.append(cand[kept])
            keep_scores.append(scores[kept])
            keep_labels.append(torch.full((len(kept),), label, dtype=torch.int64))
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append(
            {
                "boxes": torch.cat(keep_boxes) * scale,
                "scores": torch.cat(keep_scores),
                "labels": torch.cat(keep_labels),
            }
        )
    return results


def average_precision(precision: np.ndarray, recall: np.ndarray, use_07_metric: bool) -> float:
    """Area under a precision/recall curve (detections sorted by falling score).

    VOC07: mean of the best precision at recall >= t for t = 0, 0.1, ..., 1 (11 points; the
    thresholds come from np.arange as in the devkit ports, so 0.3 is 0.30000000000000004).
    VOC12 (VOC2010 onwards): exact area under the monotone (best-to-the-right) precision envelope.
    """
    precision, recall = (
        np.asarray(precision, dtype=np.float64),
        np.asarray(recall, dtype=np.float64),
    )
    if use_07_metric:
        return float(
            sum(
                precision[recall >= t].max() if (recall >= t).any() else 0.0
                for t in np.arange(0.0, 1.1, 0.1)
            )
            / 11
        )
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], precision, [0.0]])[::-1])[::-1]
    step = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[step + 1] - mrec[step]) * mpre[step + 1]))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one corner box with many, continuous coordinates (no +1), as qfgaohao's iou_of."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0.0, None), axis=1)
    area = np.prod(np.clip(box[2:] - box[:2], 0.0, None))
    areas = np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None), axis=1)
    return inter / (area + areas - inter + 1e-5)


def precision_recall(
    detections: list[dict], targets: list[dict], label: int, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray] | None:
    """The precision/recall curve of one class over a data set; None if it has no
    non-difficult box."""
    n_true = sum(int(np.sum((t["labels"] == label) & ~t["difficult"])) for t in targets)
    if n_true == 0:
        return None
    found = [
        (float(s), i, np.asarray(b, dtype=np.float64))
        for i, det in enumerate(detections)
        for b, s, lab in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
        if lab == label
    ]
    found.sort(key=lambda f: -f[0])  # stable: ties keep the data set's order
    taken: set[tuple[int, int]] = set()
    hits = []  # 1 true positive, 0 false positive; detections on difficult boxes are left out
    for _, i, box in found:
        t = targets[i]
        of_class = np.flatnonzero(t["labels"] == label)
        if len(of_class) == 0:
            hits.append(0)
            continue
        ious = box_iou(box, t["boxes"][of_class].astype(np.float64))
        best = int(np.argmax(ious))
        if ious[best] <= iou_threshold:
            hits.append(0)
        elif t["difficult"][of_class[best]]:
            continue
        elif (i, best) in taken:
            hits.append(0)
        else:
            taken.add((i, best))
            hits.append(1)
    tp = np.cumsum(hits, dtype=np.float64)
    fp = np.cumsum(1 - np.asarray(hits, dtype=np.float64))
    return tp / np.maximum(tp + fp, np.finfo(np.float64).eps), tp / n_true


def voc_map(detections: list[dict], targets: list[dict], iou_threshold: float = 0.5) -> dict:
    """VOC07 and VOC12 AP per class and their means over the classes present, in percent."""
    per_class = {}
    for label, name in enumerate(VOC_CLASSES[1:], start=1):
        curve = precision_recall(detections, targets, label, iou_threshold)
        if curve is not None:
            per_class[name] = {
                "ap07": 100.0 * average_precision(*curve, use_07_metric=True),
                "ap12": 100.0 * average_precision(*curve, use_07_metric=False),
            }
    if not per_class:
        raise DfqError(
            "No non-difficult ground-truth box in the data set: AP is undefined.",
            "check the annotations",
        )
    return {
        "map07": float(np.mean([v["ap07"] for v in per_class.values()])),
        "map12": float(np.mean([v["ap12"] for v in per_class.values()])),
        "per_class_ap": per_class,
        "n": len(targets),
    }


@torch.no_grad()
def detect_per_batch(
    model: torch.nn.Module,
    loader,
    priors: torch.Tensor | None = None,
    progress: bool = False,
    post=None,
    **nms_args,
) -> list[tuple[list[dict], list[dict]]]:
    """Run an SSD body over (images, targets) batches; decode and NMS in float on the CPU.

    Returns (detections, targets) of each batch, one entry per image; `post` (default
    `postprocess`, another model's own decoding) takes (confidences, locations, priors, image
    sizes, **nms_args).
    """
    from tqdm import tqdm

    priors = ssd_priors() if priors is None else priors
    out = []
    with evaluating(model) as device:
        for images, targets in tqdm(loader, desc="detection", disable=not progress):
            confidences, locations = model(images.to(device))
            if locations.shape[1] != priors.shape[0]:
                raise DfqError(
                    f"The model predicts {locations.shape[1]} boxes per image but there are "
                    f"{priors.shape[0]} priors.",
                    f"feed {IMAGE_SIZE}x{IMAGE_SIZE} images to the SSD-Lite, "
                    "or pass the priors of your model",
                )
            sizes = [t["size"] for t in targets]
            out.append(
                (
                    (post or postprocess)(
                        confidences.cpu(), locations.cpu(), priors, sizes, **nms_args
                    ),
                    targets,
                )
            )
    return out


def map_of(batches: list[tuple[list[dict], list[dict]]]) -> dict:
    return voc_map([d for ds, _ in batches for d in ds], [t for _, ts in batches for t in ts])


def evaluate(
    model: torch.nn.Module,
    loader,
    priors: torch.Tensor | None = None,
    progress: bool = False,
    **nms_args,
) -> dict:
    """mAP of an SSD body on a VOC loader (`VOCDetectionEval` + `collate`).

    Returns {"map07", "map12" (percent), "per_class_ap": {class: {"ap07", "ap12"}}, "n": images}.
    """
    return map_of(detect_per_batch(model, loader, priors, progress, **nms_args))


def load(options: DataOptions, inputs: InputConfig, progress: bool = False) -> EvalData:
    size = options.size or IMAGE_SIZE
    return voc_eval_data(
        options,
        YEAR,
        SPLIT,
        lambda year, split: VOCDetectionEval(options.path, year=year, split=split, size=size),
        collate,
    )


TASK = Task(
    "det",
    "ssdlite_mobilenetv2",
    ("map07", "map12"),
    load,
    lambda model, batches, progress=False, desc="": detect_per_batch(
        model, batches, progress=progress
    ),
    lambda records: MetricScore(map_of(records), ("map07", "map12")),
)
