"""Quantize-and-evaluate runs shared by the CLI and the benchmarks: one config, or the
DFQ paper's ablation rows, always paired against FP32 on the same images."""
from __future__ import annotations

import time
from typing import Any

from torch import nn

from dfq.config import PipelineConfig
from dfq.pipeline import quantize_model
from dfq.tasks.classification import Evaluation, evaluate, first_images

ABLATION = [  # the rows of the DFQ paper's ablation, each quantized
    ("Original", {}),
    ("+ReLU", {"relu": True}),
    ("+ReLU+LE", {"relu": True, "equalize": True}),
    ("+BC", {"correction": True}),
    ("+BC+clip_15", {"correction": True, "clip_weight": 15.0}),
    ("+ReLU+LE+BC", {"relu": True, "equalize": True, "correction": True}),
]
ABLATION_BASE = dict(quantize=True, relu=False, equalize=False, absorption=None, correction=False, clip_weight=None)


def run_one(model: nn.Module, config: PipelineConfig, batches, reference: Evaluation | None = None,
            progress: bool = True, label: str = "dfq") -> dict[str, Any]:
    """Quantize per `config`, evaluate on `batches`, compare with `reference` if given."""
    calib = first_images(batches, config.calib) if config.calib else None
    result = quantize_model(model, config, calib_data=calib)
    t = time.perf_counter()
    ev = evaluate(result.model, batches, progress=progress, desc=label)
    out = {"name": label, **ev.summary(), "config": config.to_dict(), "layers": result.layers,
           "activations": result.activations,
           "timings": {**result.timings, "evaluate": round(time.perf_counter() - t, 3)}}
    if reference is not None:
        out.update(ev.compare(reference))
    return out


def ablation(model: nn.Module, base: PipelineConfig, batches, reference: Evaluation,
             progress: bool = True) -> list[dict[str, Any]]:
    """FP32 and the ablation rows, each with its top-1 difference to FP32."""
    import dataclasses

    rows = [{"name": "FP32", **reference.summary()}]
    for name, overrides in ABLATION:
        cfg = dataclasses.replace(base, **{**ABLATION_BASE, **overrides})
        rows.append(run_one(model, cfg, batches, reference, progress, name))
    for r in rows:
        r["delta_top1"] = round(r["top1"] - rows[0]["top1"], 3)
    return rows


def ablation_table(rows: list[dict[str, Any]]) -> str:
    from dfq.report import markdown_table

    return markdown_table(
        ["experiment", "top1", "top5", "Δtop1 vs FP32", "agreement %", "logits SQNR dB", "pipeline s"],
        [[r["name"], r["top1"], r["top5"], r["delta_top1"], r.get("agreement"), r.get("logits_sqnr_db"),
          r.get("timings", {}).get("total")] for r in rows])
