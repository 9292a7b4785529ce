"""`dfq export` and `dfq cls --backend ort|ncnn`: quantize with a runtime profile, write the int8
model, and evaluate it in the real runtime beside its simulation."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from dfq.errors import DfqError

FORMAT_TARGET = {"onnx": "ort", "ncnn": "ncnn"}
BACKEND_FORMAT = {"ort": "onnx", "ncnn": "ncnn"}


def input_shape(args) -> tuple[int, int, int, int]:
    size = getattr(args, "input_size", None)
    if not size:
        crop = args.crop if args.crop is not None else (0 if (args.arch or "").startswith("cifar") else 224)
        size = crop or 32
    return (1, 3, size, size)


def export(result, fmt: str, out: str | Path, shape) -> dict:
    """Write result.model in `fmt`; returns what was written."""
    target = result.config.quant.target
    if FORMAT_TARGET[fmt] != target:
        raise DfqError(f"--format {fmt} needs a model quantized with --target {FORMAT_TARGET[fmt]} (got {target}).",
                       f"use --target {FORMAT_TARGET[fmt]}")
    out = Path(out)
    t = time.perf_counter()
    if fmt == "onnx":
        from dfq.export.onnx_qdq import export_onnx

        path = out if out.suffix == ".onnx" else out.with_suffix(".onnx")
        info = export_onnx(result.model, path, shape)
        files = {"onnx": str(info.path), "int8_weights": len(info.weights), "global_pools": info.pools,
                 "dropped_activations": len(info.dropped_activations)}
    else:
        from dfq.export.ncnn import export_ncnn

        info = export_ncnn(result.model, out.with_suffix("") if out.suffix in (".param", ".bin") else out, shape)
        files = {**{k: str(getattr(info, k)) for k in ("param", "bin", "fp32_param", "fp32_bin", "table")},
                 "input": info.input_name, "output": info.output_name, "int8_layers": len(info.int8_layers),
                 "float_layers": info.float_layers}
    files["export_s"] = round(time.perf_counter() - t, 2)
    return files


def runner_for(fmt: str, files: dict, threads: int | None = None, optimized_path=None):
    from dfq.runtime import NcnnRunner, OrtRunner

    if fmt == "onnx":
        return OrtRunner(files["onnx"], threads, optimized_path)
    return NcnnRunner(files["param"], files["bin"], threads or 1, files["input"], files["output"])


def quantize_for(args, model, batches, target: str, input_shape: tuple[int, ...]):
    """Quantize with the runtime's profile, with the same data sources as `dfq cls`
    (real images, or distilled ones for --distill_range / --correction distill)."""
    import dataclasses

    from dfq.cli import data_spec, pipeline_config
    from dfq.experiment import pipeline_data
    from dfq.pipeline import quantize_model

    cfg = pipeline_config(args, quantize=True)
    cfg = dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, target=target))
    data, _ = pipeline_data(model, cfg, batches, data_spec(args, cfg), progress=not getattr(args, "quiet", False),
                            input_shape=input_shape[1:])
    return quantize_model(model, cfg, calib_data=data)


def cls_backend(args) -> dict:
    """Quantize for args.backend, export, evaluate simulation and runtime on the same images."""
    import torch

    from dfq.cli import _seed, load_model, preprocess_for
    from dfq.report import markdown_table
    from dfq.runtime import integer_ops
    from dfq.targets import describe
    from dfq.tasks.classification import evaluate, load_images, materialize

    fmt = BACKEND_FORMAT[args.backend]
    target = args.target or args.backend
    if target != args.backend:
        raise DfqError(f"--backend {args.backend} runs the --target {args.backend} profile (got --target {target}).",
                       f"drop --target or use --target {args.backend}")
    _seed(args.seed)
    model = load_model(args)
    progress = not args.quiet
    source = load_images(args.data, preprocess_for(args))
    batches = materialize(source, args.limit, args.batch_size, progress)
    n = sum(len(y) for _, y in batches)
    x0 = batches[0][0]
    shape = (1, *x0.shape[1:])
    result = quantize_for(args, model, batches, target, shape)
    out_dir = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="dfq_export_"))
    files = export(result, fmt, out_dir / (args.arch or "model").replace(":", "_"), shape)
    opt_path = out_dir / "ort_optimized.onnx" if fmt == "onnx" else None
    runner = runner_for(fmt, files, torch.get_num_threads(), opt_path)
    sim = evaluate(result.model, batches, progress=progress, desc="simulation")
    real = evaluate(runner, batches, progress=progress, desc=args.backend)
    res = {"name": f"{args.backend} int8", "backend": args.backend, **real.summary(), "sim_top1": sim.summary()["top1"],
           "agreement_with_sim": real.compare(sim)["agreement"],
           "max_abs_logit_diff": round(float((real.logits - sim.logits).abs().max()), 6),
           "profile": describe(result.config.quant), "config": result.config.to_dict(), "files": files}
    if opt_path is not None:
        res["integer_ops"] = integer_ops(opt_path)
    rows = [["simulation", res["sim_top1"], None], [f"{args.backend} int8", res["top1"], res["agreement_with_sim"]]]
    if args.compare:
        fp32 = evaluate(model, batches, progress=progress, desc="fp32")
        res.update(fp32_top1=fp32.summary()["top1"], agreement=real.compare(fp32)["agreement"])
        rows.insert(0, ["FP32", res["fp32_top1"], None])
    print(f"dfq: {args.arch or args.model} on {n} images of {source.name}, --target {target}: {res['profile']}")
    print(markdown_table(["model", "top1", "argmax agreement with simulation %"], rows))
    print(f"max |logit(runtime) - logit(simulation)|: {res['max_abs_logit_diff']}; files in {out_dir}")
    return res


def cmd_export(args) -> dict:
    from dfq.cli import _seed, load_model

    _seed(args.seed)
    target = args.target or FORMAT_TARGET[args.format]
    model = load_model(args)
    batches = []
    real = args.calib or args.true_data
    if real and args.data:
        from dfq.cli import preprocess_for
        from dfq.tasks.classification import load_images, materialize

        batches = materialize(load_images(args.data, preprocess_for(args)), real, real)
    result = quantize_for(args, model, batches, target, input_shape(args))
    from dfq.targets import describe

    files = export(result, args.format, Path(args.output), input_shape(args))
    print(f"dfq: exported {args.arch or args.model} ({describe(result.config.quant)})")
    for k, v in files.items():
        print(f"  {k}: {v}")
    return {"files": files, "profile": describe(result.config.quant), "config": result.config.to_dict()}
