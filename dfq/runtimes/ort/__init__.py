"""onnxruntime: ONNX QDQ files (`dfq export --format onnx`), run on the CPU (`--backend ort`).

profile.py  what the simulation computes (uint8 / int8 grids, QLinearConv requantization)
export.py   the ONNX QDQ exporter
runner.py   an onnxruntime session as a torch module, and the integer kernels it ran
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from dfq.runtimes.ort.profile import OrtProfile

OPTIMIZED = "ort_optimized.onnx"  # onnxruntime's optimized graph, written into a run's workdir


class Ort(OrtProfile):
    def export(self, model: fx.GraphModule, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        from dfq.runtimes.ort.export import export_onnx

        path = out if out.suffix == ".onnx" else out.with_suffix(".onnx")
        info = export_onnx(model, path, shape)
        return {
            "onnx": str(info.path),
            "int8_weights": len(info.weights),
            "global_pools": info.pools,
            "dropped_activations": len(info.dropped_activations),
        }

    def runner(
        self, files: dict[str, Any], threads: int | None = None, workdir: Path | None = None
    ) -> nn.Module:
        from dfq.runtimes.ort.runner import OrtRunner

        return OrtRunner(files["onnx"], threads, Path(workdir) / OPTIMIZED if workdir else None)

    def run_details(self, files: dict[str, Any], workdir: Path | None) -> dict[str, Any]:
        from dfq.runtimes.ort.runner import integer_ops

        return {"integer_ops": integer_ops(Path(workdir) / OPTIMIZED)} if workdir else {}


RUNTIME = Ort()
