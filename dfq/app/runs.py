"""Quantize-and-evaluate runs for every task, shared by the CLI and the benchmarks.

A run quantizes the model with one config (with data only if the config needs some), scores
it on the task's images and pairs it with FP32 on the same images; an ablation is the DFQ
paper's rows; a runtime run exports the model for an int8 runtime and scores the real runtime
beside its simulation.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfq.config import CLIP_WEIGHT, PipelineConfig
from dfq.data.quantization_data import pipeline_data
from dfq.pipeline import quantize_model
from dfq.quant.mixed import weight_size
from dfq.records import Records, records_from_dict, records_to_dict
from dfq.tasks.base import EvalData, Score, Task
from dfq.utils.distributed import check_identical, world

ABLATION = [  # the rows of the DFQ paper's ablation, each quantized
    ("Original", {}),
    ("+ReLU", {"relu": True}),
    ("+ReLU+LE", {"relu": True, "equalize": True}),
    ("+BC", {"correction": True}),
    ("+BC+clip_15", {"correction": True, "clip_weight": CLIP_WEIGHT}),
    ("+ReLU+LE+BC", {"relu": True, "equalize": True, "correction": True}),
]
ABLATION_BASE = dict(
    quantize=True, relu=False, equalize=False, absorption=None, correction=False, clip_weight=None
)


def equalization_summary(layers: Records) -> dict[str, Any]:
    """How many layers were equalized, and why the others were left alone (reason: count)."""
    paired = [k for k, v in layers.items() if v.equalized_with]
    notes = Counter(v.equalize_note for v in layers.values() if v.equalize_note)
    return {"pairs": len(paired), "left_alone": dict(notes.most_common())}


def run_one(
    task: Task,
    model: nn.Module,
    config: PipelineConfig,
    data: EvalData,
    reference: Score | None = None,
    progress: bool = True,
    label: str = "dfq",
    calib_data: list[torch.Tensor] | None = None,
    device: torch.device | None = None,
    restore: dict[str, Any] | None = None,
    save: str | Path | None = None,
) -> dict[str, Any]:
    """Quantize per `config` (with `calib_data` if it needs any), score it on `data`, pair it
    with `reference` (FP32). The pipeline runs on the CPU (where its float transforms are exact
    and deterministic); the fake-quant model is evaluated on `device`. `restore`: a saved result
    (dfq.quant.saved.load_quantized) instead of the data-driven steps; `save`: write the result."""
    if calib_data is None and config.needs_data and restore is None:
        calib_data, _ = pipeline_data(
            model,
            config,
            data.batches,
            progress=progress,
            device=device,
            classifier=task.name == "cls",
        )
    result = quantize_model(
        model, config, calib_data=calib_data, progress=progress, restore=restore
    )
    check_identical(result.model, "the quantized model")
    if restore is not None and not result.reconstruction:
        result.reconstruction = records_from_dict(restore["meta"].get("reconstruction", {}))
    if save is not None and world()[0] == 0:
        from dfq.quant.saved import save_quantized

        meta = {"reconstruction": records_to_dict(result.reconstruction)}
        save_quantized(save, result.model, result.config, meta)
    t = time.perf_counter()
    score = task.evaluate(result.model.to(device or "cpu"), data.batches, progress, label)
    out = {
        "name": label,
        **score.summary(),
        "config": config.to_dict(),
        "layers": records_to_dict(result.layers),  # the JSON report, from the records
        "activations": records_to_dict(result.activations),
        "coverage": result.coverage,
        "equalization": equalization_summary(result.layers) if config.equalize else None,
        **(weight_size(result.layers) if config.quantize else {}),
        **(
            {"reconstruction": records_to_dict(result.reconstruction)}
            if result.reconstruction
            else {}
        ),
        "timings": {**result.timings, "evaluate": round(time.perf_counter() - t, 3)},
    }
    if reference is not None:
        out.update(score.compare(reference))
        out.update(score.deltas(reference))
    return out


def ablation(
    task: Task,
    model: nn.Module,
    base: PipelineConfig,
    data: EvalData,
    reference: Score,
    progress: bool = True,
    calib_data: list[torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> list[dict[str, Any]]:
    """FP32 and the ablation rows, each with its differences to FP32."""
    rows = [{"name": "FP32", **reference.summary(), **reference.deltas(reference)}]
    for name, overrides in ABLATION:
        cfg = dataclasses.replace(base, **{**ABLATION_BASE, **overrides})
        rows.append(run_one(task, model, cfg, data, reference, progress, name, calib_data, device))
    return rows


def ablation_table(task: Task, rows: list[dict[str, Any]]) -> str:
    from dfq.reporting.tables import markdown_table

    headers = ["experiment"]
    for k in task.metrics:
        headers += [k, f"Δ{k} vs FP32"]
    headers += [*task.table_columns, "pipeline s"]
    return markdown_table(
        headers,
        [
            [
                r["name"],
                *[v for k in task.metrics for v in (r[k], r.get(f"delta_{k}"))],
                *[r.get(k) for k in task.table_columns],
                r.get("timings", {}).get("total"),
            ]
            for r in rows
        ],
    )


def runtime_run(
    task: Task,
    model: nn.Module,
    config: PipelineConfig,
    data: EvalData,
    backend: str,
    calib_data: list[torch.Tensor] | None = None,
    export_dir: str | Path | None = None,
    name: str = "model",
    reference: Score | None = None,
    progress: bool = True,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Quantize with `backend`'s runtime profile, export, and score the real int8 runtime (on
    the CPU) beside its simulation (on `device`) on the same images."""
    from dfq import runtimes

    profile = runtimes.profile(backend)
    profile.check_runtime()
    config = dataclasses.replace(
        config, quantize=True, quant=dataclasses.replace(config.quant, target=backend)
    )
    result = quantize_model(model, config, calib_data=calib_data, progress=progress)
    check_identical(result.model, "the quantized model")
    out_dir = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="dfq_export_"))
    rank, size = world()
    if size > 1:  # every process exports (the same files) into a folder of its own
        out_dir = out_dir / f"rank{rank}"
    x0 = next(iter(data.batches))[0]
    files = runtimes.export(result, out_dir / name.replace(":", "_"), (1, *x0.shape[1:]))
    runner = runtimes.runner(backend, files, torch.get_num_threads(), out_dir)
    sim = task.evaluate(result.model.to(device or "cpu"), data.batches, progress, "simulation")
    real = task.evaluate(runner, data.batches, progress, backend)
    gap = real.against_simulation(sim)
    res = {
        "name": f"{backend} int8",
        "backend": backend,
        **real.summary(),
        **gap,
        "vs_simulation": gap,  # the same figures as one group, for whoever prints them
        "profile": profile.describe(result.config.quant),
        "config": result.config.to_dict(),
        "coverage": result.coverage,
        "files": files,
        "export_dir": str(out_dir),
    }
    res.update(profile.run_details(files, out_dir))
    if reference is not None:
        res.update(real.compare(reference))
    return res
