"""OpenVINO IR (.xml + .bin) of a dfq fake-quant model: the ONNX QDQ graph (the exporter
onnxruntime reads too), converted by OpenVINO with its float constants kept in float32."""

from __future__ import annotations

from pathlib import Path

from torch import fx

from dfq.runtimes.openvino.runner import EXTRA
from dfq.utils.deps import require


def export_ir(gm: fx.GraphModule, xml: Path, input_shape: tuple[int, ...]) -> dict:
    """Write `xml` and its .bin; keep the intermediate ONNX beside them (`<stem>.onnx`)."""
    from dfq.runtimes.ort.export import export_onnx

    ov = require("openvino", "OpenVINO IR export", EXTRA)
    onnx = xml.with_suffix(".onnx")
    info = export_onnx(gm, onnx, input_shape)
    # compress_to_fp16 would store the float constants (biases of float layers, scales) in fp16
    ov.save_model(ov.convert_model(str(onnx)), str(xml), compress_to_fp16=False)
    return {
        "xml": str(xml),
        "bin": str(xml.with_suffix(".bin")),
        "onnx": str(onnx),
        "int8_weights": len(info.weights),
        "dropped_activations": len(info.dropped_activations),
    }
