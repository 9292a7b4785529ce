"""Data-free activation ranges, old beside new (issue 38): mean +- 6 std against the range of
least expected error, with and without the activation bias correction.

    .venv/bin/python benchmarks/activation_ranges.py [--models mobilenet_v2,cifar_resnet20]
        [--limit N]

MobileNetV2 on the 1300 ImageNet val images of ../shared/data (CenterCrop 224, as the CLI's
--resize 0 --crop 224), the CIFAR-10 ResNets on the 10k JPEG test set. Every row is W8A8
per-tensor with every activation quantized unless its name says otherwise, paired with FP32 on
the same images (agreement, logits SQNR). Prints Markdown tables, writes
results/activation_ranges.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classification import DATA, MODELS as CLASSIFIERS  # noqa: E402, I001

from dfq import PipelineConfig, QuantConfig  # noqa: E402
from dfq.app.runs import run_one  # noqa: E402
from dfq.models import build  # noqa: E402
from dfq.models.checkpoints import load_weights  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402
from dfq.tasks.base import EvalData  # noqa: E402
from dfq.tasks.classification import TASK, Preprocess, evaluate, load_images, materialize  # noqa: E402

# the setup for MobileNetV2: CenterCrop 224 of the 227x227 images (no resize)
MODELS = {
    **CLASSIFIERS,
    "mobilenet_v2": ("pypi:mobilenet_v2", "imagenet_val1300.npz", Preprocess(0, 224)),
}
BASES = {
    "+ReLU+LE+BC": PipelineConfig(relu=True, equalize=True, correction=True),
    "ReLU6 kept +LE+BC": PipelineConfig(equalize=True, correction=True),
    "W6A6 per-channel +BC": PipelineConfig(
        correction=True, quant=QuantConfig(bits_weight=6, bits_activation=6, per_channel=True)
    ),
}
RULES = {  # the paper's absorption is c = mean - 3 std; dfq's default is 6 std (ABSORB_STD)
    "6 std": {"range_rule": "std", "absorb_std": 3.0},
    "mse": {"range_rule": "mse", "absorb_std": 3.0},
    "mse + act. BC": {"range_rule": "mse", "absorb_std": 3.0, "act_correction": True},
    "mse + absorb 6 std": {"range_rule": "mse", "absorb_std": 6.0},
    "mse / no absorption": {"range_rule": "mse", "absorption": False},
}
COLUMNS = ["top1", "delta_top1", "agreement", "logits_sqnr_db"]


def bench(name: str, limit: int | None, bases: list[str], rules: list[str]) -> list[dict]:
    weights, data, pre = MODELS[name]
    model = load_weights(build(name), weights).eval()
    batches = materialize(load_images(DATA / data, pre), limit, 100, progress=True)
    images = EvalData(batches, sum(len(y) for _, y in batches), data)
    ref = evaluate(model, batches, progress=True, desc="fp32")
    rows = []
    for base in bases:
        for rule in rules:
            fields = RULES[rule]
            cfg = dataclasses.replace(BASES[base], **fields)
            r = run_one(TASK, model, cfg, images, ref, progress=False, label=f"{base}, {rule}")
            rows.append({"model": name, "base": base, "rule": rule, **{k: r[k] for k in COLUMNS}})
    print(f"\n## {name} on {len(ref.labels)} images (FP32 top-1 {ref.topk(1):.2f})\n")
    print(
        markdown_table(
            ["pipeline", "ranges", *COLUMNS],
            [[r["base"], r["rule"], *(r[k] for k in COLUMNS)] for r in rows],
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--bases", default=",".join(BASES))
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "activation_ranges.json")
    args = p.parse_args()
    rows = [
        r
        for m in args.models.split(",")
        for r in bench(m, args.limit, args.bases.split(","), args.rules.split(","))
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
