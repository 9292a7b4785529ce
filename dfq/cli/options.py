"""argparse Namespace -> library objects. The only place that reads the CLI's arguments;
everything it builds (ModelSpec, DataOptions, PipelineConfig, DataSpec) is a plain library type."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dfq.config import (
    EqualizeConfig,
    PipelineConfig,
    QuantConfig,
    ReconstructConfig,
)
from dfq.data.quantization_data import DataSpec, default_distill
from dfq.errors import DfqError
from dfq.models.registry import InputConfig, input_config
from dfq.models.spec import ModelSpec
from dfq.tasks.base import DataOptions, Task


def model_spec(args: argparse.Namespace, task: Task | None = None) -> ModelSpec:
    """--arch / --model / --weights / --num-classes; a task's default architecture if neither."""
    arch = args.arch or (task.default_arch if task is not None and not args.model else None)
    return ModelSpec(
        arch=arch, builder=args.model, weights=args.weights, num_classes=args.num_classes
    )


def inputs_of(args: argparse.Namespace, task: Task | None = None) -> InputConfig:
    """The model's input defaults (a user's --model in seg/det gets the task's default model's,
    whose data pipeline it is fed by)."""
    return input_config(args.arch or (task.default_arch if task is not None else None))


def data_options(args: argparse.Namespace, device: torch.device | None = None) -> DataOptions:
    opt = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(DataOptions)}
    opt["pin_memory"] = device is not None and device.type == "cuda"
    opt["path"], opt["batch_size"] = args.data, args.batch_size
    opt["workers"] = getattr(args, "workers", 0)
    for k in ("mean", "std"):
        opt[k] = tuple(opt[k]) if opt[k] else None
    return DataOptions(**opt)


def parse_layer_bits(specs: list[str]) -> tuple[tuple[str, int, int | None], ...]:
    """--layer_bits PATTERN=W[,A] (repeatable) as QuantConfig.layer_bits."""
    rules = []
    for spec in specs:
        pattern, sep, bits = spec.rpartition("=")
        parts = bits.split(",")
        if not sep or not pattern or len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
            raise DfqError(
                f"--layer_bits '{spec}' is not PATTERN=W or PATTERN=W,A.",
                "e.g. --layer_bits 'features.0.*=8' or --layer_bits 'classifier.1=8,8'",
            )
        rules.append((pattern, int(parts[0]), int(parts[1]) if len(parts) == 2 else None))
    return tuple(rules)


def pipeline_config(
    args: argparse.Namespace, inputs: InputConfig | None = None, **overrides
) -> PipelineConfig:
    """The switches as a PipelineConfig (it validates them: call before any slow work)."""
    inputs = inputs or inputs_of(args)
    quant = QuantConfig(
        bits_weight=args.bits_weight,
        bits_activation=args.bits_activation,
        bits_bias=args.bits_bias,
        per_channel=args.per_channel,
        weight_symmetric=not args.asymmetric_weight,
        activation_symmetric=args.symmetric_activation,
        target=getattr(args, "target", None) or "generic",
        reduce_range=getattr(args, "reduce_range", None),
        keep_first_last=args.keep_first_last,
        layer_bits=parse_layer_bits(args.layer_bits),
        input_bits=args.input_bits,
    )
    fields = dict(
        quantize=args.quantize,
        relu=args.relu,
        equalize=args.equalize,
        absorption=args.absorption,
        equalization=EqualizeConfig(
            activation_aware=args.equalize_activations,
            residual_regions=args.equalize_residuals,
            search=args.equalize_search,
        ),
        correction=args.correction,
        clip_weight=args.clip_weight,
        quant=quant,
        range_std=args.range_std,
        calib=args.calib,
        distill_range=args.distill_range,
        true_data=args.true_data,
        strict=args.strict,
        input_mean=tuple(args.mean or inputs.mean),
        input_std=tuple(args.std or inputs.std),
        input_size=input_size(args, inputs),
    )
    rec = {
        "iterations": getattr(args, "reconstruct_iters", None),
        "seconds": getattr(args, "reconstruct_seconds", None),
        "batch_size": getattr(args, "reconstruct_batch", None),
        "fp_input_mix": getattr(args, "reconstruct_fp_mix", None),
        "round_lr": getattr(args, "reconstruct_round_lr", None),
        "round_weight": getattr(args, "reconstruct_round_weight", None),
        "mirror": False if getattr(args, "reconstruct_no_mirror", False) else None,
    }
    fields["reconstruct"] = getattr(args, "reconstruct", False)
    fields["reconstruction"] = ReconstructConfig(
        seed=getattr(args, "seed", 0), **{k: v for k, v in rec.items() if v is not None}
    )
    if args.range_percentile is not None:
        fields["range_percentile"] = args.range_percentile
    fields.update(overrides)
    return PipelineConfig(**fields)


def input_size(args: argparse.Namespace, inputs: InputConfig) -> tuple[int, int, int]:
    """(C, H, W) the model will see: --input-size (export), --crop (cls), --size (seg/det),
    else the architecture's."""
    side = next(
        (v for v in (getattr(args, k, None) for k in ("input_size", "crop", "size")) if v), None
    )
    return (inputs.size[0], side, side) if side else tuple(inputs.size)


def data_spec(args: argparse.Namespace, config: PipelineConfig) -> DataSpec:
    """--dis_* / --save / --load as a DataSpec (distillation runs only if the config needs data):
    the flags given over `default_distill`, what the Python API runs too."""
    hw = tuple(config.input_size[1:]) if config.input_size else ()
    chosen = {  # the flags given; the rest from the defaults for this run's use of the images
        "batch_size": args.dis_batch_size,
        "num_batches": args.dis_num_batch,
        "resolution": (args.dis_resolution,) * 2 if args.dis_resolution else None,
        "seconds": args.distill_seconds,
        "iterations": args.dis_iterations,
        "threshold_factor": args.dis_early_stop,
        "label_loss": args.dis_label_loss,
        "jitter": args.dis_jitter,
        "stats": args.dis_stats,
        "param": args.dis_param,
    }
    dcfg = dataclasses.replace(
        default_distill(config, hw, classifier=args.command == "cls"),
        **{k: v for k, v in chosen.items() if v is not None},
    )
    return DataSpec(distill=dcfg, load=args.load, save=args.save)


def export_shape(args: argparse.Namespace, inputs: InputConfig) -> tuple[int, int, int, int]:
    """--input-size, else --crop, else the model's input size."""
    side = args.input_size or args.crop
    return (1, inputs.size[0], side, side) if side else (1, *inputs.size)
