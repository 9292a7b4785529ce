"""OpenVINO: IR files (`dfq export --format openvino`: .xml/.bin, converted from the ONNX QDQ
graph), run by its CPU plugin (`--backend openvino`).

profile.py  what the simulation computes (onnxruntime's grids, float requantization)
export.py   the IR exporter
runner.py   a compiled OpenVINO model as a torch module
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from dfq.runtimes.openvino.profile import OpenVinoProfile


class OpenVino(OpenVinoProfile):
    def export(self, model: fx.GraphModule, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        from dfq.runtimes.openvino.export import export_ir

        return export_ir(model, out.with_suffix(".xml"), shape)

    def runner(
        self, files: dict[str, Any], threads: int | None = None, workdir: Path | None = None
    ) -> nn.Module:
        from dfq.runtimes.openvino.runner import OpenVinoRunner

        return OpenVinoRunner(files["xml"], threads)


RUNTIME = OpenVino()
