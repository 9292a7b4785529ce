"""Quantize-and-evaluate runs shared by the CLI and the benchmarks: one config, or the
DFQ paper's ablation rows, always paired against FP32 on the same images."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dfq.config import PipelineConfig
from dfq.errors import DfqError
from dfq.pipeline import quantize_model
from dfq.tasks.classification import Evaluation, evaluate, first_images

if TYPE_CHECKING:
    from dfq.distill import DistillConfig

ABLATION = [  # the rows of the DFQ paper's ablation, each quantized
    ("Original", {}),
    ("+ReLU", {"relu": True}),
    ("+ReLU+LE", {"relu": True, "equalize": True}),
    ("+BC", {"correction": True}),
    ("+BC+clip_15", {"correction": True, "clip_weight": 15.0}),
    ("+ReLU+LE+BC", {"relu": True, "equalize": True, "correction": True}),
]
ABLATION_BASE = dict(quantize=True, relu=False, equalize=False, absorption=None, correction=False, clip_weight=None)


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from when a config uses data: N real ones, or distilled."""

    true_data: int = 0
    distill: DistillConfig | None = None
    load: Path | None = None
    save: Path | None = None


def pipeline_data(model: nn.Module, config: PipelineConfig, batches, spec: DataSpec = DataSpec(),
                  progress: bool = True, input_shape: tuple[int, ...] | None = None
                  ) -> tuple[list[torch.Tensor] | None, dict[str, Any]]:
    """The input batches `config` needs (None if it is data-free), and where they came from.

    Distilled images take the shape of the real batches, or `input_shape` (C, H, W) without any.
    """
    if not config.needs_data:
        return None, {"source": "none (data-free)"}
    real = config.calib or spec.true_data
    if real:
        if not batches:
            raise DfqError(f"{real} real images were asked for (--calib / --true_data), but none were given.",
                           "pass --data")
        return first_images(batches, real), {"source": "real", "images": real}
    from dfq.distill import DistillConfig, distill, load_distilled, save_distilled

    if spec.load:
        data, dcfg = load_distilled(spec.load)
        return list(data.split(dcfg.batch_size)), {"source": "distilled", "loaded": str(spec.load),
                                                   "images": len(data), "config": dcfg.to_dict()}
    dcfg = spec.distill or DistillConfig(mean=config.input_mean, std=config.input_std)
    shape = tuple(input_shape or batches[0][0].shape[1:])
    res = distill(model, dcfg, input_shape=shape, progress=progress)
    if spec.save:
        save_distilled(spec.save, res.data, res.config)
    return list(res.data.split(dcfg.batch_size)), {
        "source": "distilled", "images": len(res.data), "seconds": round(res.seconds, 2),
        "iterations": list(res.iterations), "final_losses": [round(v, 3) for v in res.losses],
        "config": res.config.to_dict()}


def run_one(model: nn.Module, config: PipelineConfig, batches, reference: Evaluation | None = None,
            progress: bool = True, label: str = "dfq", data: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Quantize per `config` (with `data` if it needs any), evaluate on `batches`, compare."""
    if data is None and config.needs_data:
        data, _ = pipeline_data(model, config, batches, progress=progress)
    result = quantize_model(model, config, calib_data=data)
    t = time.perf_counter()
    ev = evaluate(result.model, batches, progress=progress, desc=label)
    out = {"name": label, **ev.summary(), "config": config.to_dict(), "layers": result.layers,
           "activations": result.activations,
           "timings": {**result.timings, "evaluate": round(time.perf_counter() - t, 3)}}
    if reference is not None:
        out.update(ev.compare(reference))
    return out


def ablation(model: nn.Module, base: PipelineConfig, batches, reference: Evaluation,
             progress: bool = True, data: list[torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """FP32 and the ablation rows, each with its top-1 difference to FP32."""
    import dataclasses

    rows = [{"name": "FP32", **reference.summary()}]
    for name, overrides in ABLATION:
        cfg = dataclasses.replace(base, **{**ABLATION_BASE, **overrides})
        rows.append(run_one(model, cfg, batches, reference, progress, name, data))
    for r in rows:
        r["delta_top1"] = round(r["top1"] - rows[0]["top1"], 3)
    return rows


def ablation_table(rows: list[dict[str, Any]]) -> str:
    from dfq.report import markdown_table

    return markdown_table(
        ["experiment", "top1", "top5", "Δtop1 vs FP32", "agreement %", "logits SQNR dB", "pipeline s"],
        [[r["name"], r["top1"], r["top5"], r["delta_top1"], r.get("agreement"), r.get("logits_sqnr_db"),
          r.get("timings", {}).get("total")] for r in rows])
