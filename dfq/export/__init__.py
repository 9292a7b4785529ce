"""Exporters of the fake-quant model to real int8 runtimes (imported lazily: onnx, ncnn).

    from dfq.export.onnx_qdq import export_onnx   # ONNX QDQ for onnxruntime
    from dfq.export.ncnn import export_ncnn       # ncnn int8 .param/.bin (+ calibration table)
"""
