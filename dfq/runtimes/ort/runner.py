"""onnxruntime on dfq's batches: an ONNX file as a torch module (NCHW float in, logits out), so
`dfq.tasks.classification.evaluate` works on it unchanged; and the integer kernels it ran.
"""

from __future__ import annotations

import collections
from pathlib import Path

import torch

from dfq.utils.deps import require

EXTRA = "export"  # the pyproject extra that installs onnx, onnxscript and onnxruntime

# onnxruntime's integer kernels (what QDQ groups become after graph optimization)
INTEGER_OPS = {
    "QLinearConv",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "QLinearConcat",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearReduceMean",
    "QLinearSoftmax",
    "QLinearWhere",
    "NhwcQLinearConv",
}


class OrtRunner(torch.nn.Module):
    """An onnxruntime CPU session with full graph optimization (QDQ -> integer kernels)."""

    def __init__(
        self, path: str | Path, threads: int | None = None, optimized_path: str | Path | None = None
    ):
        super().__init__()
        ort = require("onnxruntime", "--backend ort", EXTRA)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if optimized_path:
            opts.optimized_model_filepath = str(optimized_path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or the tuple of its outputs (e.g. an SSD's scores and boxes)."""
        outs = self.session.run(
            None, {self.input_name: x.detach().cpu().float().contiguous().numpy()}
        )
        return (
            torch.from_numpy(outs[0])
            if len(outs) == 1
            else tuple(torch.from_numpy(o) for o in outs)
        )


def op_counts(onnx_path: str | Path) -> collections.Counter:
    onnx = require("onnx", "counting ONNX operators", EXTRA)

    return collections.Counter(n.op_type for n in onnx.load(str(onnx_path)).graph.node)


def integer_ops(optimized_path: str | Path) -> dict[str, int]:
    """The integer kernels in a graph onnxruntime optimized (saved via optimized_path)."""
    return {k: v for k, v in op_counts(optimized_path).items() if k in INTEGER_OPS}
