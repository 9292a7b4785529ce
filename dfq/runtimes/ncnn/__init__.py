"""ncnn: int8 .param/.bin files (`dfq export --format ncnn`), run on the CPU (`--backend ncnn`).

profile.py  what the simulation computes (symmetric int8, reciprocal scales, ncnn's multipliers)
export.py   the ncnn int8 exporter (pnnx for the float graph, dfq for the int8 layers)
runner.py   an ncnn net as a torch module
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from dfq.runtimes.ncnn.profile import NcnnProfile


class Ncnn(NcnnProfile):
    def export(self, model: fx.GraphModule, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        from dfq.runtimes.ncnn.export import export_ncnn

        info = export_ncnn(
            model, out.with_suffix("") if out.suffix in (".param", ".bin") else out, shape
        )
        return {
            **{
                k: str(getattr(info, k))
                for k in ("param", "bin", "fp32_param", "fp32_bin", "table")
            },
            "input": info.input_name,
            "outputs": info.output_names,
            "int8_layers": len(info.int8_layers),
            "float_layers": info.float_layers,
        }

    def runner(
        self, files: dict[str, Any], threads: int | None = None, workdir: Path | None = None
    ) -> nn.Module:
        from dfq.runtimes.ncnn.runner import NcnnRunner

        return NcnnRunner(
            files["param"],
            files.get("bin"),
            threads or 1,
            files.get("input", "in0"),
            files.get("outputs", ["out0"]),
        )


RUNTIME = Ncnn()
