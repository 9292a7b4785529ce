"""PASCAL VOC 2012 semantic segmentation: data, the jfzhang95 eval transform, mIoU, evaluate().

The transform and the metric follow jfzhang95/pytorch-deeplab-xception's validation, so its
published figure for the MobileNetV2 DeepLab-v3+ (70.81% mIoU, VOC12 val, crop 513) is the
reference: resize the short side to `crop_size` (image bilinear, mask nearest), centre-crop a
square, normalise with the ImageNet mean/std, score on the cropped mask. Label 255 (object
borders, "void") is ignored; a class absent from both ground truth and prediction has no IoU
and is left out of the mean, as `np.nanmean` does there.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dfq.config import IMAGENET_MEAN, IMAGENET_STD
from dfq.errors import DfqError
from dfq.models.registry import InputConfig
from dfq.tasks.base import DataOptions, EvalData, MetricScore, Task, evaluating, voc_eval_data
from dfq.tasks.voc import VOC_CLASSES, open_voc

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
YEAR, SPLIT, CROP = "2012", "val", 513


def fix_scale_crop(
    image: Image.Image, mask: Image.Image, crop_size: int
) -> tuple[Image.Image, Image.Image]:
    """jfzhang95's FixScaleCrop: short side to crop_size, then a centred crop_size square."""
    w, h = image.size
    if w > h:
        oh, ow = crop_size, int(1.0 * w * crop_size / h)
    else:
        ow, oh = crop_size, int(1.0 * h * crop_size / w)
    image = image.resize((ow, oh), Image.Resampling.BILINEAR)
    mask = mask.resize((ow, oh), Image.Resampling.NEAREST)
    x1, y1 = int(round((ow - crop_size) / 2.0)), int(round((oh - crop_size) / 2.0))
    box = (x1, y1, x1 + crop_size, y1 + crop_size)
    return image.crop(box), mask.crop(box)


def to_tensors(image: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> normalised float CHW; palette mask -> int64 HW of class ids (255 kept)."""
    x = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(
        STD, np.float32
    )
    return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(
        np.asarray(mask, dtype=np.int64).copy()
    )


class VOCSegmentationVal(Dataset):
    """(image, mask) pairs of a VOC segmentation split, transformed for evaluation."""

    def __init__(
        self, root: str | Path, split: str = "val", year: str = "2012", crop_size: int = 513
    ):
        self.voc = open_voc(root, year, split, segmentation=True)
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.voc[index]
        if mask.mode not in ("P", "L"):
            raise DfqError(
                f"Mask '{self.voc.targets[index]}' has mode {mask.mode}; "
                "class ids need a palette or grey PNG.",
                "use the SegmentationClass PNGs of VOCdevkit (not colour renderings)",
            )
        return to_tensors(*fix_scale_crop(image, mask, self.crop_size))


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true class, predicted class] over pixels whose label is a class (255 etc.
    skipped)."""
    if target.shape != pred.shape:
        raise DfqError(
            f"Target shape {tuple(target.shape)} differs from prediction {tuple(pred.shape)}."
        )
    valid = (target >= 0) & (target < num_classes)
    index = num_classes * target[valid].long() + pred[valid].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> np.ndarray:
    """Intersection over union per class from a confusion matrix; NaN where a class never occurs."""
    cm = cm.double().numpy()
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes that occur (in ground truth or prediction), as a fraction."""
    iou = iou_per_class(cm)
    return float(np.nanmean(iou)) if not np.isnan(iou).all() else math.nan


@torch.no_grad()
def confusion_per_batch(
    model: torch.nn.Module, loader, num_classes: int = len(VOC_CLASSES), progress: bool = False
) -> list[tuple[torch.Tensor, int]]:
    """(confusion matrix, images) of each (image, mask) batch; inputs go to the model's device."""
    from tqdm import tqdm

    out = []
    with evaluating(model) as device:
        for images, masks in tqdm(loader, desc="segmentation", disable=not progress):
            logits = model(images.to(device))
            if logits.shape[-2:] != masks.shape[-2:]:
                raise DfqError(
                    f"Model output {tuple(logits.shape[-2:])} does not match mask size "
                    f"{tuple(masks.shape[-2:])}.",
                    "upsample the logits to the input size inside the model",
                )
            out.append(
                (confusion_matrix(masks, logits.argmax(1).cpu(), num_classes), images.shape[0])
            )
    return out


def miou_of(batches: list[tuple[torch.Tensor, int]]) -> dict:
    """{"miou": percent, "per_class_iou": [percent, or None for a class that never occurs], "n"}."""
    n = sum(k for _, k in batches)
    if n == 0:
        raise DfqError(
            "The segmentation loader yielded no images.",
            "check the split list and the dataset path",
        )
    cm = sum(c for c, _ in batches)
    iou = iou_per_class(cm)
    return {
        "miou": 100.0 * mean_iou(cm),
        "per_class_iou": [None if math.isnan(v) else 100.0 * float(v) for v in iou],
        "n": n,
    }


def evaluate(
    model: torch.nn.Module, loader, num_classes: int = len(VOC_CLASSES), progress: bool = False
) -> dict:
    """Run `model` (logits N x C x H x W at input size) over (image, mask) batches; score mIoU."""
    return miou_of(confusion_per_batch(model, loader, num_classes, progress))


def load(options: DataOptions, inputs: InputConfig, progress: bool = False) -> EvalData:
    crop = options.size or CROP
    return voc_eval_data(
        options,
        YEAR,
        SPLIT,
        lambda year, split: VOCSegmentationVal(options.path, split, year=year, crop_size=crop),
    )


TASK = Task(
    "seg",
    "deeplabv3plus_mobilenetv2",
    ("miou",),
    load,
    lambda model, batches, progress=False, desc="": confusion_per_batch(
        model, batches, progress=progress
    ),
    lambda records: MetricScore(miou_of(records), ("miou",)),
)
