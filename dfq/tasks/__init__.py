"""Tasks: data, preprocessing, metrics and evaluate() for classification, segmentation, detection.

Each task module ends with its `TASK` (dfq.tasks.base.Task); `get(name)` imports only the one asked for.
"""
from __future__ import annotations

import importlib

from dfq.tasks.base import Task

MODULES = {"cls": "classification", "seg": "segmentation", "det": "detection"}


def get(name: str) -> Task:
    return importlib.import_module(f"dfq.tasks.{MODULES[name]}").TASK
