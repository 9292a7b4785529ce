"""The model registry: dfq's own architectures by name, every torchvision builder, and with the
`timm` extra every timm model as `timm:NAME`.

Each entry carries its input defaults (`InputConfig`, as timm's pretrained_cfg): the input
size, the normalisation the weights were trained with, and the classification resize/crop.
Everything that needs them (the CLI's preprocessing, export shapes, the data-free input
moments) reads them here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from dfq.config import IMAGENET_MEAN, IMAGENET_STD
from dfq.errors import DfqError


@dataclass(frozen=True)
class InputConfig:
    """What a model expects: (C, H, W), (x/255 - mean) / std, and timm-style eval resize/crop
    (0 = none)."""

    size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"  # of the resize: torchvision InterpolationMode value
    # the dfq.tasks module that evaluates this architecture when the task's own pre-/post-
    # processing does not fit it (a TF detector's resize, anchors and NMS: "tf_ssd");
    # None: the task's
    evaluation: str | None = None


IMAGENET = InputConfig()
TIMM = "timm:"  # --arch timm:NAME: a timm model (pip install "dfq[timm]")
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], InputConfig]] = {}


def register(name: str, inputs: InputConfig = IMAGENET):
    """Decorator: make a builder available to `build()` and the CLI's --arch."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = (fn, inputs)
        return fn

    return wrap


def available() -> list[str]:
    import torchvision

    return sorted(_REGISTRY) + sorted(torchvision.models.list_models())


def _timm(name: str):
    """The timm module, after checking that `name` (without the prefix) is one of its models."""
    from dfq.utils.deps import require

    timm = require("timm", f"`arch`={TIMM}{name}")
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise DfqError(
            f"timm has no model named '{name}'.",
            f"use one of {[TIMM + c for c in close]}"
            if close
            else "see timm.list_models() for the names",
        )
    return timm


def timm_input_config(name: str) -> InputConfig:
    """timm's pretrained_cfg as an InputConfig: input size, mean/std, and its eval transform
    (resize the shorter side to floor(crop / crop_pct), center-crop, its interpolation)."""
    cfg = _timm(name).models.get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET
    size = tuple(cfg.input_size)
    crop = size[-1]
    resize = int(crop / cfg.crop_pct) if cfg.crop_pct else crop
    interpolation = (
        cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    )
    return InputConfig(
        size=size,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        resize=resize,
        crop=crop,
        interpolation=interpolation,
    )


def _unknown(name: str) -> DfqError:
    close = difflib.get_close_matches(name, available(), n=3)
    return DfqError(
        f"Unknown architecture '{name}'.",
        f"use one of {close}"
        if close
        else "see `dfq archs` for the list, or pass `builder`=file.py:callable",
    )


def build(name: str, **kwargs) -> nn.Module:
    """Build an untrained model by registry name (dfq's own first, then torchvision's)."""
    import torchvision

    if name.startswith(TIMM):
        return _timm(name[len(TIMM) :]).create_model(name[len(TIMM) :], pretrained=False, **kwargs)
    if name in _REGISTRY:
        return _REGISTRY[name][0](**kwargs)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, **kwargs)
    raise _unknown(name)


def input_config(name: str | None) -> InputConfig:
    """The input defaults of an architecture (ImageNet's for torchvision and user models)."""
    if name is None:
        return IMAGENET
    if name.startswith(TIMM):
        return timm_input_config(name[len(TIMM) :])
    return _REGISTRY[name][1] if name in _REGISTRY else IMAGENET
