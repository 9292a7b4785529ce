"""A tiny VOCdevkit written into a temporary folder, so VOC readers and evaluate() run without
the data.

VOC2012 has a segmentation val split (palette PNG masks with 255 borders) and a detection val
split; VOC2007 has a detection test split. Image sizes are chosen so that, with crop_size=32,
the segmentation eval transform only crops (no resizing): expected scores can be worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# id: (width, height); the short side is 32 everywhere.
SIZES = {"2008_000001": (40, 32), "2008_000002": (32, 48), "2008_000003": (32, 32)}

SEG_LABELS = {"2008_000001": 12, "2008_000002": 8, "2008_000003": 15}  # dog, cat, person

# Detection ground truth: id -> [(class name, (xmin, ymin, xmax, ymax) 1-based, difficult or None)].
# None writes no <difficult> tag (some VOC2012 objects have none; it means 0).
OBJECTS = {
    "2008_000001": [("dog", (5, 6, 30, 28), 0), ("person", (20, 2, 38, 30), 1)],
    "2008_000002": [("cat", (2, 3, 20, 25), 0), ("cat", (10, 20, 30, 46), None)],
    "2008_000003": [("car", (4, 4, 28, 20), 0)],
}


def voc_palette() -> list[int]:
    """The VOC colour map (bits of the class id spread over R, G, B), 256 entries flattened."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def seg_mask(w: int, h: int, label: int) -> np.ndarray:
    """Background, one `label` rectangle, a 1-pixel 255 outline around it."""
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[h // 4 - 1 : 3 * h // 4 + 1, w // 4 - 1 : 3 * w // 4 + 1] = 255
    mask[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = label
    return mask


def _xml(image_id: str, size: tuple[int, int], objects) -> str:
    parts = [f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename>"]
    parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), difficult in objects:
        tag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
        parts.append(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>{tag}"
            f"<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    parts.append("</annotation>")
    return "".join(parts)


def make_voc(root: Path) -> dict[str, np.ndarray]:
    """Write root/VOCdevkit/{VOC2007,VOC2012}; return the segmentation masks by image id."""
    rng = np.random.default_rng(0)
    palette = voc_palette()
    masks = {}
    for year, det_split in (("2012", "val"), ("2007", "test")):
        base = root / "VOCdevkit" / f"VOC{year}"
        for sub in (
            "JPEGImages",
            "Annotations",
            "SegmentationClass",
            "ImageSets/Main",
            "ImageSets/Segmentation",
        ):
            (base / sub).mkdir(parents=True, exist_ok=True)
        for image_id, (w, h) in SIZES.items():
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                base / "JPEGImages" / f"{image_id}.jpg"
            )
            (base / "Annotations" / f"{image_id}.xml").write_text(
                _xml(image_id, (w, h), OBJECTS[image_id])
            )
            mask = seg_mask(w, h, SEG_LABELS[image_id])
            png = Image.frombytes("P", (w, h), mask.tobytes())
            png.putpalette(palette)
            png.save(base / "SegmentationClass" / f"{image_id}.png")
            masks[image_id] = mask
        (base / "ImageSets" / "Main" / f"{det_split}.txt").write_text("\n".join(SIZES) + "\n")
        (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(SIZES) + "\n")
    return masks
