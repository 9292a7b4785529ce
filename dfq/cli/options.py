"""argparse Namespace -> library objects. The only place that reads the CLI's arguments;
everything it builds (ModelSpec, DataOptions, PipelineConfig, DataSpec) is a plain library type."""

from __future__ import annotations

import argparse
import dataclasses
import re

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

# Library errors name the fields of dfq's config types in backticks (`bits_weight`,
# `reconstruction.iterations`); the CLI shows the flag that sets each. A field whose flag is not
# spelled `--<field>` is listed here; every other field is its own flag (see `field_flags`).
_FIELD_FLAGS = {
    "builder": "--model",
    "path": "--data",
    "calib_data": "--data",
    "input_mean": "--mean",
    "input_std": "--std",
    "weight_symmetric": "--asymmetric_weight",
    "activation_symmetric": "--symmetric_activation",
    "equalization.search": "--equalize_search",
    "equalization.activation_aware": "--equalize_activations",
    "equalization.residual_regions": "--equalize_residuals",
    "reconstruction.iterations": "--reconstruct_iters",
    "reconstruction.seconds": "--reconstruct_seconds",
    "reconstruction.batch_size": "--reconstruct_batch",
    "reconstruction.fp_input_mix": "--reconstruct_fp_mix",
    "reconstruction.round_lr": "--reconstruct_round_lr",
    "reconstruction.round_weight": "--reconstruct_round_weight",
    "reconstruction.mirror": "--reconstruct_no_mirror",
    "reconstruction.window": "--reconstruct_window",
    "distill.batch_size": "--dis_batch_size",
    "distill.num_batches": "--dis_num_batch",
    "distill.resolution": "--dis_resolution",
    "distill.iterations": "--dis_iterations",
    "distill.threshold_factor": "--dis_early_stop",
    "distill.label_loss": "--dis_label_loss",
    "distill.jitter": "--dis_jitter",
    "distill.seconds": "--distill_seconds",
}


def field_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Config field -> the flag that sets it: each option's own name (its `dest`) and the
    renamed fields above, over the parser and all its sub-commands."""
    flags: dict[str, str] = {}
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif action.option_strings and action.dest != "help":
                flags.setdefault(action.dest, action.option_strings[0])
    return {**flags, **_FIELD_FLAGS}


def as_flags(message: str, flags: dict[str, str]) -> str:
    """A library message with each backticked config field shown as its flag (`field`=value as
    `--flag value`); other backticked text (a command, a file) is left as it is."""

    def flag(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        return flags[name] + (" " if value else "") if name in flags else m.group(0)

    return re.sub(r"`([A-Za-z_][\w.]*)`(=?)", flag, message)


def model_spec(args: argparse.Namespace, task: Task | None = None) -> ModelSpec:
    """--arch / --model / --weights / --num_classes; a task's default architecture if neither."""
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
        absorb_std=args.absorb_std,
        equalization=EqualizeConfig(
            activation_aware=args.equalize_activations,
            residual_regions=args.equalize_residuals,
            search=args.equalize_search,
        ),
        correction=args.correction,
        clip_weight=args.clip_weight,
        quant=quant,
        range_std=args.range_std,
        range_rule=args.range_rule,
        act_correction=args.act_correction,
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
        "window": getattr(args, "reconstruct_window", None),
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
    """(C, H, W) the model will see: --input_size (export), --crop (cls), --size (seg/det),
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
    """--input_size, else --crop, else the model's input size."""
    side = args.input_size or args.crop
    return (1, inputs.size[0], side, side) if side else (1, *inputs.size)
