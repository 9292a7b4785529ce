"""One description for every task dfq evaluates: classification, segmentation, detection.

A `Task` names its default architecture and headline metrics, loads its evaluation data from
`DataOptions`, and evaluates a model (float, fake-quant, or an int8 runtime) into a `Score`.
The run layer (dfq.app.runs) and the CLI only ever talk to these two types.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import nn

from dfq.models.registry import InputConfig


class Score(Protocol):
    """A model's evaluation on a task's images, with the paired comparisons dfq reports."""

    def summary(self) -> dict[str, Any]:
        """The headline metrics, rounded, and `n`."""

    def compare(self, reference: "Score") -> dict[str, Any]:
        """Paired figures against FP32 on the same images (`fp32_<metric>`, ...)."""

    def deltas(self, reference: "Score") -> dict[str, Any]:
        """The ablation table's differences to FP32."""

    def against_simulation(self, simulation: "Score") -> dict[str, Any]:
        """How an int8 runtime's results differ from the simulation's."""


@dataclass(frozen=True)
class DataOptions:
    """Where the evaluation images are and how to read them; None = the task's/model's default."""

    path: str
    limit: int | None = None
    batch_size: int = 64
    workers: int = 0
    resize: int | None = None  # classification: shorter side (0 = none)
    crop: int | None = None  # classification: center crop (0 = none)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    year: str | None = None  # VOC
    split: str | None = None  # VOC
    size: int | None = None  # VOC: seg crop / det input side
    pin_memory: bool = False  # page-locked batches, for a CUDA device


@dataclass
class EvalData:
    """Batches of (inputs, labels) a task can evaluate on again and again."""

    batches: Iterable
    n: int
    description: str  # e.g. "1300 images of imagenet_val1300.npz"
    meta: dict[str, Any] = field(default_factory=dict)  # for the JSON (e.g. VOC year and split)


@dataclass(frozen=True)
class Task:
    name: str
    default_arch: str | None
    metrics: tuple[str, ...]  # headline metrics, percent; the first is the primary one
    load: Callable[[DataOptions, InputConfig, bool], EvalData]
    per_batch: Callable[..., list]  # (model, batches, progress, desc) -> one record per batch
    score: Callable[[list], Score]  # the records of all batches, in order -> Score
    table_columns: tuple[str, ...] = ()  # paired figures the tables show beside the metrics

    def evaluate(
        self, model: nn.Module, batches: Iterable, progress: bool = False, desc: str = "eval"
    ) -> Score:
        """Score `model` on `batches` (split over the processes of a torchrun, see
        dfq.utils.distributed)."""
        from dfq.utils.distributed import gather_batches, shard_batches

        mine, indices = shard_batches(batches)
        return self.score(gather_batches(self.per_batch(model, mine, progress, desc), indices))


def voc_eval_data(
    options: DataOptions,
    year: str,
    split: str,
    dataset_of: Callable[[str, str], Any],
    collate=None,
    note: str = "",
    **detail: Any,
) -> EvalData:
    """A VOC split (`options.year`/`split`, else the task's `year`/`split`) as a re-iterable
    DataLoader over the first `options.limit` items of `dataset_of(year, split)` (nothing held
    in memory), described for the report."""
    from torch.utils.data import DataLoader, Subset

    year, split = options.year or year, options.split or split
    dataset = dataset_of(year, split)
    if options.limit is not None:
        dataset = Subset(dataset, range(min(options.limit, len(dataset))))
    loader = DataLoader(
        dataset,
        batch_size=options.batch_size,
        shuffle=False,
        num_workers=options.workers,
        collate_fn=collate,
        pin_memory=options.pin_memory,
    )
    n, about = len(dataset), {"year": year, "split": split, **detail}
    return EvalData(loader, n, f"{n} images of VOC{year} {split}{note}", about)


@dataclass
class MetricScore:
    """A Score from a task's metric dict (segmentation's mIoU, detection's mAPs): the headline
    metrics in percent and the full dict as `detail`."""

    values: dict[str, Any]
    metrics: tuple[str, ...]

    def summary(self) -> dict[str, Any]:
        return {
            **{k: round(self.values[k], 3) for k in self.metrics},
            "n": self.values["n"],
            "detail": self.values,
        }

    def compare(self, reference: "MetricScore") -> dict[str, Any]:
        out = {}
        for k in self.metrics:
            out[f"fp32_{k}"] = round(reference.values[k], 3)
            out[f"delta_{k}"] = round(round(self.values[k], 3) - round(reference.values[k], 3), 3)
        return out

    def deltas(self, reference: "MetricScore") -> dict[str, Any]:
        return self.compare(reference)

    def against_simulation(self, simulation: "MetricScore") -> dict[str, Any]:
        return {f"sim_{k}": round(simulation.values[k], 3) for k in self.metrics} | {
            f"delta_{k}_vs_sim": round(self.values[k] - simulation.values[k], 3)
            for k in self.metrics
        }


@contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """The model in eval mode (its training mode given back afterwards, also on an error),
    and the device its inputs must go to: an evaluation never leaves the user's model changed."""
    param = next(iter(model.parameters()), None)
    was_training = model.training
    model.eval()
    try:
        yield param.device if param is not None else torch.device("cpu")
    finally:
        model.train(was_training)
