"""Classification: image sources, timm-style preprocessing, and top-k / paired evaluation.

Sources: an ImageNet-style folder (class subfolders), the .npz formats of ../shared/data
(JPEG bytes + offsets, or decoded NHWC images), or the foolbox wheel's labelled ImageNet
photos (read from the zip, foolbox itself is never installed or imported).
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dfq.config import IMAGENET_MEAN, IMAGENET_STD
from dfq.errors import DfqError
from dfq.models.registry import InputConfig
from dfq.tasks.base import DataOptions, EvalData, Task, evaluating


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side (0 = keep), center-crop (0 = none), scale to [0,1], normalise."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        from torchvision import transforms as T

        steps = []
        if self.resize:
            steps.append(
                T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation))
            )
        if self.crop:
            steps.append(T.CenterCrop(self.crop))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


class ImageSource(Dataset):
    """(image tensor, label) pairs from decoded PIL images produced by `load(i)`."""

    def __init__(
        self, n: int, load: Callable[[int], Image.Image], labels: np.ndarray, transform, name: str
    ):
        self.n, self.load, self.labels, self.transform, self.name = n, load, labels, transform, name

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.transform(self.load(i)), int(self.labels[i])


def _decode(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:
        raise DfqError(
            f"{what} could not be decoded as an image ({exc}).",
            "remove or replace that file; dfq does not silently skip images",
        ) from exc


def _from_npz(path: Path, transform) -> ImageSource:
    try:
        d = np.load(path)
        keys = set(d.files)
    except Exception as exc:
        raise DfqError(
            f"{path} is not a readable .npz file ({exc}).",
            "re-save it with numpy.savez (no pickled objects)",
        ) from exc
    if "labels" not in keys or not ({"jpeg", "offsets"} <= keys or "images" in keys):
        raise DfqError(
            f"{path} has arrays {sorted(keys)}, not a known image format.",
            "use jpeg+offsets+labels or images(NHWC uint8)+labels, as in ../shared/data",
        )
    labels = d["labels"]
    if "images" in keys:
        images = d["images"]
        return ImageSource(
            len(images),
            lambda i: Image.fromarray(images[i]).convert("RGB"),
            labels,
            transform,
            path.name,
        )
    jpeg, off = d["jpeg"], d["offsets"]
    return ImageSource(
        len(off) - 1,
        lambda i: _decode(jpeg[off[i] : off[i + 1]].tobytes(), f"{path.name} image {i}"),
        labels,
        transform,
        path.name,
    )


def _from_foolbox_wheel(path: Path, transform) -> ImageSource:
    """foolbox/data/imagenet_<idx>_<label>.jpg files inside the wheel (MIT)."""
    with zipfile.ZipFile(path) as z:
        names = sorted(
            n for n in z.namelist() if re.search(r"foolbox/data/imagenet_\d+_\d+\.\w+$", n)
        )
        blobs = [z.read(n) for n in names]
    if not names:
        raise DfqError(
            f"{path} contains no foolbox/data/imagenet_* images.", "use foolbox==3.3.4's wheel"
        )
    labels = np.array([int(re.search(r"_(\d+)\.\w+$", n).group(1)) for n in names])
    return ImageSource(
        len(names), lambda i: _decode(blobs[i], names[i]), labels, transform, path.name
    )


def _from_folder(path: Path, transform) -> ImageSource:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    files = [
        (f, c)
        for c, name in enumerate(classes)
        for f in sorted((path / name).iterdir())
        if f.suffix.lower() in exts
    ]
    if not files:
        raise DfqError(
            f"{path} holds no images in class subfolders.",
            "point `path` at a folder like val/<class>/<image>.jpg, or at a .npz",
        )
    labels = np.array([c for _, c in files])
    return ImageSource(
        len(files),
        lambda i: _decode(files[i][0].read_bytes(), str(files[i][0])),
        labels,
        transform,
        path.name,
    )


def load_images(path: str | Path, preprocess: Preprocess = Preprocess()) -> ImageSource:
    """Any supported image source, preprocessed on access."""
    path = Path(path)
    if not path.exists():
        raise DfqError(f"data path {path} does not exist.", "check `path`")
    t = preprocess.transform()
    if path.is_dir():
        return _from_folder(path, t)
    if path.suffix == ".npz":
        return _from_npz(path, t)
    if path.suffix == ".whl":
        return _from_foolbox_wheel(path, t)
    raise DfqError(
        f"{path} is not a folder, .npz or foolbox .whl.",
        "give a folder, a .npz or a foolbox .whl as `path`",
    )


def materialize(
    source: ImageSource,
    limit: int | None = None,
    batch_size: int = 64,
    progress: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode once into batches (in `workers` processes), so an ablation evaluates many models
    on the same tensors."""
    from tqdm import tqdm

    n = len(source) if not limit else min(limit, len(source))
    subset = torch.utils.data.Subset(source, range(n))
    loader = DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory
    )
    return [
        (x, y)
        for x, y in tqdm(loader, desc=f"decode {source.name}", disable=not progress, leave=False)
    ]


@dataclass
class Evaluation:
    logits: torch.Tensor
    labels: torch.Tensor

    def topk(self, k: int) -> float:
        k = min(k, self.logits.shape[1])
        hit = (self.logits.topk(k, dim=1).indices == self.labels[:, None]).any(1)
        return 100.0 * float(hit.float().mean())

    def summary(self) -> dict:
        return {
            "top1": round(self.topk(1), 3),
            "top5": round(self.topk(5), 3),
            "n": len(self.labels),
        }

    def agreement(self, other: "Evaluation") -> float:
        """Percent of images whose top-1 class equals `other`'s."""
        return round(
            100.0 * float((self.logits.argmax(1) == other.logits.argmax(1)).float().mean()), 3
        )

    def compare(self, reference: "Evaluation") -> dict:
        """Paired figures against a reference run on the same images (far less noisy)."""
        from dfq.quant.primitives import sqnr_db

        return {
            "fp32_top1": round(reference.topk(1), 3),
            "agreement": self.agreement(reference),
            "logits_sqnr_db": round(sqnr_db(reference.logits, self.logits), 2),
        }

    def deltas(self, reference: "Evaluation") -> dict:
        return {"delta_top1": round(round(self.topk(1), 3) - round(reference.topk(1), 3), 3)}

    def against_simulation(self, simulation: "Evaluation") -> dict:
        """How far the runtime is from its simulation: the largest logit difference, and on
        how many images any logit is off by more than float rounding (1e-4): a handful of
        images points at single rounding flips, many at a systematic difference."""
        diff = (self.logits - simulation.logits).abs()
        return {
            "sim_top1": round(simulation.topk(1), 3),
            "agreement_with_sim": self.agreement(simulation),
            "max_abs_logit_diff": round(float(diff.max()), 6),
            "images_off_sim": int((diff.amax(1) > 1e-4).sum()),
            "sim_logit_absmax": round(float(simulation.logits.abs().max()), 4),  # Δ's scale
        }


def logits_per_batch(
    model: torch.nn.Module, batches, progress: bool = False, desc: str = "eval"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of each batch, on the CPU; inputs go to the model's device."""
    from tqdm import tqdm

    out = []
    with evaluating(model) as device, torch.no_grad():
        for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
            out.append((model(x.to(device)).float().cpu(), y))
    return out


def evaluation_of(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Evaluation:
    return Evaluation(torch.cat([lg for lg, _ in batches]), torch.cat([y for _, y in batches]))


def evaluate(
    model: torch.nn.Module, batches, progress: bool = False, desc: str = "eval"
) -> Evaluation:
    return evaluation_of(logits_per_batch(model, batches, progress, desc))


def load(options: DataOptions, inputs: InputConfig, progress: bool = False) -> EvalData:
    """The images of `options.path`, preprocessed as the options say or the model expects,
    decoded once into batches (an ablation evaluates many models on the same tensors)."""
    pre = Preprocess(
        resize=inputs.resize if options.resize is None else options.resize,
        crop=inputs.crop if options.crop is None else options.crop,
        mean=tuple(options.mean or inputs.mean),
        std=tuple(options.std or inputs.std),
        interpolation=inputs.interpolation,
    )
    source = load_images(options.path, pre)
    batches = materialize(
        source, options.limit, options.batch_size, progress, options.workers, options.pin_memory
    )
    n = sum(len(y) for _, y in batches)
    return EvalData(batches, n, f"{n} images of {source.name}")


TASK = Task(
    "cls",
    None,
    ("top1",),
    load,
    logits_per_batch,
    evaluation_of,
    ("top5", "agreement", "logits_sqnr_db"),
)
