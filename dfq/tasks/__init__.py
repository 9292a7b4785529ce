"""Tasks: data, preprocessing, metrics and evaluate() for classification, segmentation, detection.

Each task module ends with its `TASK` (dfq.tasks.base.Task); `get(name)` imports only the one
asked for.
"""

from __future__ import annotations

import importlib

from dfq.errors import DfqError
from dfq.models.registry import InputConfig
from dfq.tasks.base import Task

MODULES = {"cls": "classification", "seg": "segmentation", "det": "detection"}


def get(name: str, inputs: InputConfig | None = None) -> Task:
    """The task `name` (cls, seg, det), or the variant that evaluates an architecture whose
    `InputConfig.evaluation` names one (e.g. a TF detector's own pre- and post-processing)."""
    module = inputs.evaluation if inputs is not None and inputs.evaluation else MODULES[name]
    task = importlib.import_module(f"dfq.tasks.{module}").TASK
    if task.name != name:
        raise DfqError(
            f"this architecture is evaluated by `dfq {task.name}`, not `dfq {name}`.",
            f"run `dfq {task.name} ...`",
        )
    return task
