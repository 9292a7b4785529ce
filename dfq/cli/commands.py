"""The bodies of `dfq cls|seg|det`, `dfq export` and `dfq archs`: build library objects from
the arguments (dfq.cli.options), call the library, print tables, return the JSON result."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from dfq import runtimes, tasks
from dfq.app.runs import ablation, ablation_table, run_one, runtime_run
from dfq.cli import options
from dfq.data.quantization_data import pipeline_data
from dfq.errors import DfqError
from dfq.quant.mixed import check_layer_bits
from dfq.records import records_from_dict
from dfq.reporting.coverage import summary
from dfq.reporting.tables import layer_table, markdown_table
from dfq.tasks.base import Task
from dfq.utils.distributed import world
from dfq.utils.seed import seed_everything


def run_task(args: argparse.Namespace) -> dict[str, Any]:
    """`dfq cls|seg|det`: quantize, evaluate paired with FP32, or the ablation, or a runtime."""
    task = tasks.get(args.command)
    backend = getattr(args, "backend", "torch")
    if backend != "torch" and args.target not in (None, backend):
        raise DfqError(
            f"--backend {backend} runs the --target {backend} profile "
            f"(got --target {args.target}).",
            f"drop --target or use --target {backend}",
        )
    if backend != "torch":
        runtimes.profile(backend).check_runtime()
    seed_everything(args.seed)
    spec, inputs = options.model_spec(args, task), options.inputs_of(args, task)
    task = tasks.get(args.command, inputs)
    cfg = options.pipeline_config(
        args, inputs, **({"quantize": True} if backend != "torch" else {})
    )
    model, device = spec.load(), args.device
    cfg, restore = _restored(args, cfg, backend != "torch" or args.ablation)
    check_layer_bits(model, cfg.quant)
    progress = not args.quiet
    data = task.load(options.data_options(args, device), inputs, progress)
    print(f"dfq {task.name}: {spec.name} on {data.description}")
    # a model traced with static shapes is traced for the images it will see
    cfg = dataclasses.replace(cfg, input_size=tuple(next(iter(data.batches))[0].shape[1:]))
    common = {
        "task": task.name,
        "arch": spec.name,
        "data": str(args.data),
        "device": str(device),
        "processes": world()[1],
        # float sums run in another order at another thread count: distillation and
        # reconstruction are reproducible for a seed *and* this
        "threads": torch.get_num_threads(),
        **data.meta,
    }
    reference = None
    if args.compare or args.ablation:
        reference = task.evaluate(copy.deepcopy(model).to(device), data.batches, progress, "fp32")
    if restore is not None:
        calib, calib_info = None, {"source": f"restored from {args.load_quantized}"}
    else:
        calib, calib_info = pipeline_data(
            model, cfg, data.batches, options.data_spec(args, cfg), progress, device=device
        )
    common["quantization_data"] = calib_info
    if backend != "torch":
        return _print_runtime(
            task,
            runtime_run(
                task,
                model,
                cfg,
                data,
                backend,
                calib,
                args.export_dir,
                spec.name,
                reference,
                progress,
                device,
            ),
            common,
        )
    if args.ablation:
        rows = ablation(task, model, cfg, data, reference, progress, calib, device)
        print(
            f"\nW{args.bits_weight}A{args.bits_activation} ablation, "
            f"quantization data: {calib_info['source']}\n"
            f"{ablation_table(task, rows)}"
        )
        print(f"{rows[-1]['name']}: {summary(rows[-1]['coverage'])}")
        return {"rows": rows, "n": data.n, "coverage": rows[-1]["coverage"], **common}
    res = {
        **run_one(
            task,
            model,
            cfg,
            data,
            reference,
            progress,
            "dfq" if cfg.quantize else "float",
            calib,
            device,
            restore,
            getattr(args, "save_quantized", None),
        ),
        **common,
    }
    if getattr(args, "save_quantized", None):
        print(f"saved the quantized model to {args.save_quantized}")
    if getattr(args, "plot", None):
        from dfq.reporting.tables import plot_weight_ranges

        png = plot_weight_ranges(records_from_dict(res["layers"]), args.plot)
        print(f"wrote {png}" if png else "--plot: no layer was equalized (add --equalize)")
    if not args.quiet:
        print(layer_table(records_from_dict(res["layers"])))
    if res["equalization"]:
        eq = res["equalization"]
        print(
            f"equalization: {eq['pairs']} pairs; left alone: "
            + ", ".join(f"{c} x {why}" for why, c in eq["left_alone"].items())
        )
    if res.get("reconstruction"):
        blocks = res["reconstruction"]
        print(
            f"reconstruction: {len(blocks)} blocks, "
            f"{sum(b['learned'] for b in blocks.values())} improved on round-to-nearest; "
            "output MSE per block: "
            + ", ".join(
                f"{k} {b['mse_before']:.3g}->{b['mse_after']:.3g}" for k, b in blocks.items()
            )
        )
    keys = [
        *task.metrics,
        *("top5",) * (task.name == "cls"),
        "n",
        *(f"fp32_{k}" for k in task.metrics),
        *(f"delta_{k}" for k in task.metrics),
        *task.table_columns,
        "weight_bytes",
    ]
    print(
        markdown_table(["metric", "value"], [[k, res[k]] for k in dict.fromkeys(keys) if k in res])
    )
    print(f"pipeline: {res['timings']['total']} s, evaluation: {res['timings']['evaluate']} s")
    print(summary(res["coverage"]))
    return res


def _restored(args: argparse.Namespace, cfg, unsupported: bool = False):
    """--load_quantized: the saved config (the pipeline switches are ignored) and the state."""
    path = getattr(args, "load_quantized", None)
    if path is None:
        return cfg, None
    if unsupported:
        raise DfqError(
            "--load_quantized evaluates one saved model with --backend torch.",
            "drop --ablation / --backend, or quantize again",
        )
    from dfq.quant.saved import load_quantized

    saved, restore = load_quantized(path)
    print(
        f"dfq: restored the quantized model of {path} (its own config; pipeline switches ignored)"
    )
    return saved, restore


def _print_runtime(task: Task, res: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
    metric = task.metrics[0]
    rows = [["simulation", res[f"sim_{metric}"]], [f"{res['backend']} int8", res[metric]]]
    if f"fp32_{metric}" in res:
        rows.insert(0, ["FP32", res[f"fp32_{metric}"]])
    print(f"--target {res['backend']}: {res['profile']}")
    print(markdown_table(["model", metric], rows))
    diff = {k: v for k, v in res["vs_simulation"].items() if not k.startswith("sim_")}
    print(", ".join(f"{k}: {v}" for k, v in diff.items()) + f"; files in {res['export_dir']}")
    print(summary(res["coverage"]))
    return {**res, **common}


def export(args: argparse.Namespace) -> dict[str, Any]:
    """`dfq export`: quantize with the format's runtime profile and write the int8 model."""
    from dfq.pipeline import quantize_model

    profile = runtimes.by_format(args.format)
    if args.target not in (None, profile.name):
        raise DfqError(
            f"--format {args.format} needs a model quantized with --target {profile.name} "
            f"(got {args.target}).",
            f"use --target {profile.name}",
        )
    profile.check_runtime()
    seed_everything(args.seed)
    spec, inputs = options.model_spec(args), options.inputs_of(args)
    cfg = options.pipeline_config(args, inputs, quantize=True)
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, target=profile.name))
    model = spec.load()
    cfg, restore = _restored(args, cfg)
    if restore is not None and cfg.quant.target != profile.name:
        raise DfqError(
            f"{args.load_quantized} was quantized for --target {cfg.quant.target}, "
            f"not {profile.name} (--format {args.format}).",
            f"quantize and save it again with --target {profile.name}",
        )
    check_layer_bits(model, cfg.quant)
    shape = options.export_shape(args, inputs)
    batches = None
    real = cfg.calib or cfg.true_data
    if real and args.data and restore is None:
        from dfq.tasks.base import DataOptions
        from dfq.tasks.classification import load

        batches = load(
            DataOptions(
                args.data,
                limit=real,
                batch_size=real,
                resize=args.resize,
                crop=args.crop,
                mean=cfg.input_mean,
                std=cfg.input_std,
            ),
            inputs,
        ).batches
    calib = None
    if restore is None:
        calib, _ = pipeline_data(
            model,
            cfg,
            batches,
            options.data_spec(args, cfg),
            progress=True,
            input_shape=shape[1:],
            device=args.device,
        )
    result = quantize_model(model, cfg, calib_data=calib, progress=True, restore=restore)
    if getattr(args, "save_quantized", None):
        from dfq.quant.saved import save_quantized

        save_quantized(args.save_quantized, result.model, result.config)
    files = runtimes.export(result, Path(args.output), shape)
    described = profile.describe(result.config.quant)
    print(f"dfq: exported {spec.name} ({described})")
    for k, v in files.items():
        print(f"  {k}: {v}")
    print(summary(result.coverage))
    return {
        "files": files,
        "profile": described,
        "config": result.config.to_dict(),
        "coverage": result.coverage,
    }


def archs(args: argparse.Namespace) -> dict[str, Any]:
    from dfq import models

    names = models.available()
    print("\n".join(names))
    print('timm:NAME  (any name of timm.list_models(), with pip install "dfq[timm]")')
    return {"archs": names}
