"""OpenVINO on dfq's batches: a compiled IR (or ONNX) model on the CPU as a torch module (NCHW
float in, the model's outputs out), so every task's `evaluate` scores it unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfq.utils.deps import require

EXTRA = "openvino"  # the pyproject extra that installs openvino (and the ONNX exporter's deps)


class OpenVinoRunner(torch.nn.Module):
    """OpenVINO's CPU plugin at float32 inference precision: its low-precision transformations
    turn the QDQ pairs into int8 kernels; the float parts stay float32 (the default hint may
    pick bf16 on CPUs that have it, which the simulation does not model)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        ov = require("openvino", "the OpenVINO runtime", EXTRA)
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or the tuple of its outputs (e.g. an SSD's scores and boxes)."""
        result = self.compiled(x.detach().cpu().float().contiguous().numpy())
        outs = [torch.from_numpy(np.array(result[o])) for o in self.compiled.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)
