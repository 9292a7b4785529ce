"""The images a pipeline config needs, when it needs any: real ones, or ZeroQ distilled ones.

Data-free configs need none. `calib` / `true_data` take the first images of the evaluation
batches; otherwise images are distilled from the model's BN statistics (or loaded from --load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from dfq.config import PipelineConfig
from dfq.distill import DistillConfig
from dfq.errors import DfqError


@dataclass(frozen=True)
class DataSpec:
    """How distilled images are made (or where they are saved and loaded)."""

    distill: DistillConfig | None = None
    load: Path | None = None
    save: Path | None = None


def first_images(batches: Iterable, n: int) -> list[torch.Tensor]:
    """The first n images of (inputs, labels) batches, as input batches."""
    out, have = [], 0
    for x, _ in batches:
        if have >= n:
            break
        out.append(x[: n - have])
        have += len(out[-1])
    return out


def pipeline_data(
    model: nn.Module,
    config: PipelineConfig,
    batches: Iterable | None,
    spec: DataSpec = DataSpec(),
    progress: bool = True,
    input_shape: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
    """The input batches `config` needs (None if it is data-free), on the CPU where the pipeline
    runs, and where they came from.

    Distilled images take `input_shape` (C, H, W), else the shape of the first real batch; they
    are distilled on `device` (default: the model's).
    """
    if not config.needs_data:
        return None, {"source": "none (data-free)"}
    real = config.calib or config.true_data
    if real:
        images = first_images(batches or [], real)
        if not images:
            raise DfqError(
                f"{real} real images were asked for (--calib / --true_data), but none were given.",
                "pass --data",
            )
        return images, {"source": "real", "images": real}
    from dfq.distill import distill, load_distilled, preset, save_distilled

    if spec.load:
        data, dcfg = load_distilled(spec.load)
        return list(data.split(dcfg.batch_size)), {
            "source": "distilled",
            "loaded": str(spec.load),
            "images": len(data),
            "config": dcfg.to_dict(),
        }
    dcfg = spec.distill or DistillConfig(
        mean=config.input_mean,
        std=config.input_std,
        **preset(config.reconstruct, classifier=False),
    )
    shape = tuple(input_shape or next(iter(batches))[0].shape[1:])
    res = distill(model, dcfg, input_shape=shape, progress=progress, device=device)
    if spec.save:
        save_distilled(spec.save, res.data, res.config)
    return list(res.data.split(dcfg.batch_size)), {
        "source": "distilled",
        "images": len(res.data),
        "seconds": round(res.seconds, 2),
        "iterations": list(res.iterations),
        "final_losses": [round(v, 3) for v in res.losses],
        "early_stop_loss": res.threshold,
        "cut_by_time": list(res.cut),
        "config": res.config.to_dict(),
    }
