"""Model registry: dfq's own architectures by name, then every torchvision builder."""
from __future__ import annotations

import difflib
from typing import Callable

from torch import nn

from dfq.errors import DfqError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: make a builder available to `build()` and the CLI's --arch."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_builtin() -> None:
    # Imported for their @register side effect; kept lazy so `import dfq` stays light.
    from dfq.models import cifar_resnet, deeplab, ssdlite, tf_ssdlite  # noqa: F401


def available() -> list[str]:
    import torchvision

    _load_builtin()
    return sorted(_REGISTRY) + sorted(torchvision.models.list_models())


def build(name: str, **kwargs) -> nn.Module:
    """Build an untrained model by registry name (dfq's own first, then torchvision's)."""
    import torchvision

    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, **kwargs)
    close = difflib.get_close_matches(name, available(), n=3)
    raise DfqError(
        f"Unknown architecture '{name}'.",
        f"use one of {close}" if close else "see `dfq archs` for the list, or pass --model file.py:callable",
    )
