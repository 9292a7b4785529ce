"""Architectures the tasks need that torchvision lacks, and the name registry (--arch).

Importing this package registers dfq's own builders (their modules use @register).
"""

from dfq.models import cifar_resnet, deeplab, ssdlite, tf_ssdlite  # noqa: F401  (register themselves)
from dfq.models.registry import IMAGENET, InputConfig, available, build, input_config, register

__all__ = ["IMAGENET", "InputConfig", "available", "build", "input_config", "register"]
