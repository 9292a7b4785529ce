"""dfq: data-free quantization of PyTorch CNNs (Nagel et al., ICCV 2019; ZeroQ, CVPR 2020).

    import dfq
    config = dfq.PipelineConfig(relu=True, equalize=True, correction=True)
    result = dfq.quantize_model(model, config)
    result.model      # fake-quant fx.GraphModule, same forward signature as `model`
    result.layers     # what was done to each layer

Each step is public too: trace, fold_batchnorm, replace_relu6, equalize, absorb_high_bias,
clip_weights, quantize_weights, correct_bias. Importing dfq never imports onnx/onnxruntime/ncnn.
"""

from dfq.config import EqualizeConfig, PipelineConfig, QuantConfig, ReconstructConfig
from dfq.errors import DfqError
from dfq.graph.layers import find_pairs
from dfq.graph.trace import trace
from dfq.pipeline import QuantizationResult, quantize_model
from dfq.quant.weights import quantize_weights
from dfq.statistics.bn import BNStats
from dfq.statistics.moments import input_moments, propagate
from dfq.transforms.bias_absorb import absorb_high_bias
from dfq.transforms.bias_correct import correct_bias
from dfq.transforms.bn_fold import fold_batchnorm
from dfq.transforms.clip import clip_weights
from dfq.transforms.equalize import equalize
from dfq.transforms.relu6 import replace_relu6

__all__ = [
    "BNStats",
    "DfqError",
    "EqualizeConfig",
    "PipelineConfig",
    "QuantConfig",
    "QuantizationResult",
    "ReconstructConfig",
    "absorb_high_bias",
    "clip_weights",
    "correct_bias",
    "equalize",
    "find_pairs",
    "fold_batchnorm",
    "input_moments",
    "propagate",
    "quantize_model",
    "quantize_weights",
    "replace_relu6",
    "trace",
]
