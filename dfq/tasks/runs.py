"""`dfq seg` and `dfq det`: quantize DeepLab-v3+ / SSD-Lite bodies and score them on VOC.

Only the network body goes through the pipeline (traced, equalized, fake-quantized); the
pre-processing (dataset transforms), prior decoding and NMS stay in float outside the graph,
in dfq.tasks.segmentation / dfq.tasks.detection. Runs and ablation rows mirror `dfq cls`
(dfq.experiment): same switches, same rows, each paired with FP32 on the same images.
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from dfq.config import PipelineConfig


@dataclass(frozen=True)
class Task:
    name: str
    arch: str                        # default --arch
    year: str                        # default --year
    split: str                       # default --split
    metrics: tuple[str, ...]         # headline metrics, percent (the first is the primary one)
    mean: tuple[float, ...]          # the input normalisation, as (x/255 - mean) / std
    std: tuple[float, ...]


SEG = Task("seg", "deeplabv3plus_mobilenetv2", "2012", "val", ("miou",),
           (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# qfgaohao's (x - 127) / 128 on 0..255 pixels
DET = Task("det", "ssdlite_mobilenetv2", "2007", "test", ("map07", "map12"),
           (127.0 / 255,) * 3, (128.0 / 255,) * 3)
TASKS = {t.name: t for t in (SEG, DET)}


def dataset(task: Task, root, year: str, split: str, size: int | None):
    if task is SEG:
        from dfq.tasks.segmentation import VOCSegmentationVal

        return VOCSegmentationVal(root, split=split, year=year, crop_size=size or 513)
    from dfq.tasks.detection import IMAGE_SIZE, VOCDetectionEval

    return VOCDetectionEval(root, year=year, split=split, size=size or IMAGE_SIZE)


def loader(task: Task, ds, limit: int | None, batch_size: int, workers: int = 0):
    """A re-iterable DataLoader over the first `limit` items (nothing is held in memory)."""
    from torch.utils.data import DataLoader, Subset

    if limit is not None:
        ds = Subset(ds, range(min(limit, len(ds))))
    collate = None
    if task is DET:
        from dfq.tasks.detection import collate
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate)


def evaluator(task: Task) -> Callable[..., dict]:
    if task is SEG:
        from dfq.tasks.segmentation import evaluate
    else:
        from dfq.tasks.detection import evaluate
    return evaluate


def head_batches(batches, n_images: int) -> list:
    """The first batches holding at least n_images images (at least one batch), as a list."""
    out, have = [], 0
    for x, y in batches:
        out.append((x, y))
        have += len(x)
        if have >= n_images:
            break
    return out


def equalization_summary(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """How many layers were equalized, and why the others were left alone (reason: count)."""
    paired = [k for k, v in layers.items() if v.get("equalized_with")]
    notes = Counter(v["equalize_note"] for v in layers.values() if v.get("equalize_note"))
    return {"pairs": len(paired), "left_alone": dict(notes.most_common())}


def compare(task: Task, res: dict, reference: dict | None) -> dict:
    if reference is None:
        return {}
    out = {}
    for k in task.metrics:
        out[f"fp32_{k}"] = reference[k]
        out[f"delta_{k}"] = round(res[k] - reference[k], 3)
    return out


def run_one(task: Task, model: nn.Module, config: PipelineConfig, batches, reference: dict | None = None,
            progress: bool = True, label: str = "dfq", data: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Quantize the body per `config`, score it on `batches`, compare with `reference` (FP32)."""
    from dfq.pipeline import quantize_model

    if data is None and config.needs_data:
        from dfq.experiment import pipeline_data

        data, _ = pipeline_data(model, config, head_batches(batches, config.calib or 1), progress=progress)
    result = quantize_model(model, config, calib_data=data)
    t = time.perf_counter()
    ev = evaluator(task)(result.model, batches, progress=progress)
    out = {"name": label, **{k: round(ev[k], 3) for k in task.metrics}, "n": ev["n"], "config": config.to_dict(),
           "layers": result.layers, "activations": result.activations,
           "equalization": equalization_summary(result.layers) if config.equalize else None,
           "timings": {**result.timings, "evaluate": round(time.perf_counter() - t, 3)}, "detail": ev}
    out.update(compare(task, out, reference))
    return out


def fp32(task: Task, model: nn.Module, batches, progress: bool = True) -> dict[str, Any]:
    ev = evaluator(task)(model, batches, progress=progress)
    return {"name": "FP32", **{k: round(ev[k], 3) for k in task.metrics}, "n": ev["n"], "detail": ev}


def ablation(task: Task, model: nn.Module, base: PipelineConfig, batches, reference: dict,
             progress: bool = True, data: list[torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """FP32 and dfq.experiment.ABLATION's rows, each with its metric differences to FP32."""
    from dfq.experiment import ABLATION, ABLATION_BASE

    rows = [{**reference, **compare(task, reference, reference)}]
    for name, overrides in ABLATION:
        cfg = dataclasses.replace(base, **{**ABLATION_BASE, **overrides})
        rows.append(run_one(task, model, cfg, batches, reference, progress, name, data))
    return rows


def ablation_table(task: Task, rows: list[dict[str, Any]]) -> str:
    from dfq.report import markdown_table

    headers = ["experiment"]
    for k in task.metrics:
        headers += [k, f"Δ{k} vs FP32"]
    headers.append("pipeline s")
    return markdown_table(headers, [[r["name"], *[v for k in task.metrics for v in (r[k], r.get(f"delta_{k}"))],
                                     r.get("timings", {}).get("total")] for r in rows])


def cmd_task(args, task: Task) -> dict:
    """The body of `dfq seg` / `dfq det` (argument parsing lives in dfq.cli)."""
    from dfq.cli import _seed, data_spec, load_model, pipeline_config
    from dfq.experiment import pipeline_data
    from dfq.report import layer_table, markdown_table

    _seed(args.seed)
    if not args.arch and not args.model:
        args.arch = task.arch
    args.mean = args.mean or list(task.mean)
    args.std = args.std or list(task.std)
    cfg = pipeline_config(args)  # validate the switches before any slow work
    model = load_model(args)
    progress = not args.quiet
    year, split = args.year or task.year, args.split or task.split
    ds = dataset(task, args.data, year, split, args.size)
    batches = loader(task, ds, args.limit, args.batch_size, args.workers)
    n = len(batches.dataset)
    arch = args.arch or args.model
    print(f"dfq {task.name}: {arch} on {n} images of VOC{year} {split}")
    reference = fp32(task, model, batches, progress) if args.compare or args.ablation else None
    head = head_batches(batches, max(cfg.calib, args.true_data, 1)) if cfg.needs_data else batches
    data, data_info = pipeline_data(model, cfg, head, data_spec(args, cfg), progress)
    common = {"task": task.name, "arch": arch, "data": str(args.data), "year": year, "split": split,
              "quantization_data": data_info}
    if args.ablation:
        rows = ablation(task, model, cfg, batches, reference, progress, data)
        print(f"\nW{args.bits_weight}A{args.bits_activation} ablation, quantization data: {data_info['source']}\n"
              f"{ablation_table(task, rows)}")
        return {"rows": rows, "n": n, **common}
    res = run_one(task, model, cfg, batches, reference, progress, "dfq" if cfg.quantize else "float", data)
    res.update(common)
    if not args.quiet:
        print(layer_table(res["layers"]))
    if res["equalization"]:
        eq = res["equalization"]
        print(f"equalization: {eq['pairs']} pairs; left alone: "
              + ", ".join(f"{c} x {why}" for why, c in eq["left_alone"].items()))
    keys = [*task.metrics, "n", *(f"fp32_{k}" for k in task.metrics), *(f"delta_{k}" for k in task.metrics)]
    print(markdown_table(["metric", "value"], [[k, res[k]] for k in keys if k in res]))
    print(f"pipeline: {res['timings']['total']} s, evaluation: {res['timings']['evaluate']} s")
    return res
