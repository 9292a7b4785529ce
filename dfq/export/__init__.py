"""Exporters of the fake-quant model to real int8 runtimes (imported lazily: onnx, ncnn).

    from dfq.export.onnx_qdq import export_onnx   # ONNX QDQ for onnxruntime
    from dfq.export.ncnn import export_ncnn       # ncnn int8 .param/.bin (+ calibration table)

`export(result, out, shape)` writes a pipeline result in its runtime profile's format and
`runner(...)` runs what it wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from dfq import targets
from dfq.errors import DfqError
from dfq.targets.base import Profile


def export(result, out: str | Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """Write `result.model` (a dfq.pipeline.QuantizationResult) in the format of the runtime
    profile it was quantized for; returns what was written."""
    profile = targets.profile(result.config.quant.target)
    if profile.format is None:
        raise DfqError(
            "the model was quantized with --target generic, which no runtime runs exactly.",
            "quantize with --target "
            + " or --target ".join(p.name for p in targets.PROFILES.values() if p.format),
        )
    profile.check_runtime()
    out = Path(out)
    t = time.perf_counter()
    if profile.format == "onnx":
        from dfq.export.onnx_qdq import export_onnx

        path = out if out.suffix == ".onnx" else out.with_suffix(".onnx")
        info = export_onnx(result.model, path, shape)
        files = {
            "onnx": str(info.path),
            "int8_weights": len(info.weights),
            "global_pools": info.pools,
            "dropped_activations": len(info.dropped_activations),
        }
    else:
        from dfq.export.ncnn import export_ncnn

        info = export_ncnn(
            result.model, out.with_suffix("") if out.suffix in (".param", ".bin") else out, shape
        )
        files = {
            **{
                k: str(getattr(info, k))
                for k in ("param", "bin", "fp32_param", "fp32_bin", "table")
            },
            "input": info.input_name,
            "output": info.output_name,
            "int8_layers": len(info.int8_layers),
            "float_layers": info.float_layers,
        }
    files["export_s"] = round(time.perf_counter() - t, 2)
    return files


def runner(
    profile: Profile, files: dict[str, Any], threads: int | None = None, optimized_path=None
) -> nn.Module:
    """The real runtime on what `export` wrote, as a torch module (tensors in, tensors out)."""
    from dfq.runners import NcnnRunner, OrtRunner

    if profile.format == "onnx":
        return OrtRunner(files["onnx"], threads, optimized_path)
    return NcnnRunner(files["param"], files["bin"], threads or 1, files["input"], files["output"])
