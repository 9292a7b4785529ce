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


class VocSplit:
    """The images of a VOC split with their segmentation masks or detection annotations.

    Read from the split's list file itself, so any `ImageSets/<kind>/<name>.txt` works (a
    500-image subset, a user's own list), not only the names torchvision's VOC classes accept.
    Items are (RGB PIL image, mask PIL image) or (RGB PIL image, annotation dict with "size"
    {"width", "height"} and "object" [{"name", "bndbox" {"xmin", ...}, "difficult"}]).
    """

    def __init__(self, voc_root: Path, year: str, split: str, segmentation: bool):
        base = voc_root / "VOCdevkit" / f"VOC{year}"
        kind = "Segmentation" if segmentation else "Main"
        ids = (base / "ImageSets" / kind / f"{split}.txt").read_text().split()
        self.segmentation = segmentation
        self.images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        folder, suffix = ("SegmentationClass", ".png") if segmentation else ("Annotations", ".xml")
        self.targets = [base / folder / f"{i}{suffix}" for i in ids]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.open(self.images[index]).convert("RGB")
        if self.segmentation:
            return image, Image.open(self.targets[index])
        return image, read_annotation(self.targets[index])


def read_annotation(path: Path) -> dict:
    """The fields of a VOC annotation XML that scoring needs, as strings."""
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    size = root.find("size")

    def text(node, tag: str) -> str | None:
        child = node.find(tag) if node is not None else None
        return child.text.strip() if child is not None and child.text else None

    objects = [
        {
            "name": text(obj, "name") or "",
            "difficult": text(obj, "difficult"),
            "bndbox": {k: text(obj.find("bndbox"), k) for k in ("xmin", "ymin", "xmax", "ymax")},
        }
        for obj in root.iter("object")
    ]
    return {
        "size": {"width": text(size, "width"), "height": text(size, "height")},
        "object": objects,
    }


def open_voc(root: str | Path, year: str, split: str, segmentation: bool) -> VocSplit:
    """A VOC split (segmentation masks or detection annotations), found from any level of the
    folder; a missing list file fails naming the lists that exist."""
    voc_root = find_voc_root(root, year)
    check_split(voc_root, year, "Segmentation" if segmentation else "Main", split)
    return VocSplit(voc_root, year, split, segmentation)
