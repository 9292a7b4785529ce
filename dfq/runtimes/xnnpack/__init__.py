"""ExecuTorch with the XNNPACK delegate: a PT2E-style graph whose quantize/dequantize ops carry
dfq's own scales and zero points, lowered to XNNPACK (`dfq export --format pte`: a .pte
program), run by ExecuTorch's Python runtime on the CPU (`--backend xnnpack`).

profile.py  what the simulation computes (int8 grids, requantization as XNNPACK's qs8 kernels)
export.py   the .pte exporter
runner.py   an ExecuTorch program as a torch module
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from dfq.runtimes.xnnpack.profile import XnnpackProfile


class Xnnpack(XnnpackProfile):
    def export(self, model: fx.GraphModule, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        from dfq.runtimes.xnnpack.export import export_pte

        return export_pte(model, out.with_suffix(".pte"), shape)

    def runner(
        self, files: dict[str, Any], threads: int | None = None, workdir: Path | None = None
    ) -> nn.Module:
        from dfq.runtimes.xnnpack.runner import XnnpackRunner

        return XnnpackRunner(files["pte"])


RUNTIME = Xnnpack()
