"""PASCAL VOC conventions shared by segmentation and detection: class ids, folder layout."""

from __future__ import annotations

from pathlib import Path

from dfq.errors import DfqError

# Index 0 is background in both tasks; 1..20 are the VOC classes in their usual order
# (the segmentation PNG values, and the label order of qfgaohao/pytorch-ssd's models).
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def find_voc_root(path: str | Path, year: str) -> Path:
    """The folder that holds `VOCdevkit/VOC<year>` (torchvision's `root`), from any level of it.

    Accepts the parent of VOCdevkit, VOCdevkit itself, or VOCdevkit/VOC<year>: users point at
    all three.
    """
    path = Path(path)
    for root in (path, path.parent, path.parent.parent):
        if (root / "VOCdevkit" / f"VOC{year}").is_dir():
            return root
    raise DfqError(
        f"No VOCdevkit/VOC{year} folder found at or above '{path}'.",
        f"pass the folder that contains VOCdevkit/VOC{year} (with JPEGImages, ImageSets, ...)",
    )


def check_split(root: Path, year: str, kind: str, split: str) -> None:
    """Fail with the missing path before torchvision fails with a bare FileNotFoundError."""
    path = root / "VOCdevkit" / f"VOC{year}" / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        present = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DfqError(
            f"The image list '{path}' does not exist.",
            f"use one of the splits present: {present}"
            if present
            else "check the VOCdevkit layout",
        )


def open_voc(root: str | Path, year: str, split: str, segmentation: bool):
    """torchvision's VOC dataset of a split (segmentation masks or detection annotations), found
    from any level of the folder and failing with dfq's errors, not a bare FileNotFoundError."""
    import torchvision

    voc_root = find_voc_root(root, year)
    check_split(voc_root, year, "Segmentation" if segmentation else "Main", split)
    kind = (
        torchvision.datasets.VOCSegmentation if segmentation else torchvision.datasets.VOCDetection
    )
    return kind(str(voc_root), year=year, image_set=split, download=False)
