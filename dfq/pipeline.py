"""The whole data-free pipeline as one call: trace -> fold BN -> ReLU6 policy -> equalize ->
absorb high bias -> clip -> quantize weights -> correct bias -> activation ranges -> biases.

Every step is also a public function of its own; this module only sequences them, times
them, and merges their per-layer notes into one report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import fx, nn

from dfq.config import PipelineConfig
from dfq.graph.trace import check_finite, trace
from dfq.graph.ops import layer_kind, weighted_module
from dfq.moments import input_moments, propagate
from dfq.quant.activations import (calibrate, insert_quantizers, quantization_points, quantize_biases,
                                   set_ranges_from_moments, snap_clips_to_grid)
from dfq.quant.integer_exact import make_integer_exact_, make_ncnn_exact_
from dfq.quant.weights import quantize_weights
from dfq.stats import Stats
from dfq.transforms import Transformed
from dfq.transforms.bias_absorb import absorb_high_bias
from dfq.transforms.bias_correct import correct_bias, correct_bias_empirical_
from dfq.transforms.bn_fold import fold_batchnorm
from dfq.transforms.clip import clip_weights
from dfq.transforms.equalize import equalize
from dfq.transforms.relu6 import replace_relu6


@dataclass
class QuantizationResult:
    model: fx.GraphModule          # the fake-quant model (or the transformed float one)
    float_model: fx.GraphModule    # after the float transforms, before quantization
    stats: Stats
    config: PipelineConfig
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def single_threaded():
    """The transforms are thousands of tiny tensor ops: extra threads only add overhead
    (and stall badly when the cores are shared). Restores the caller's setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Steps:
    """Runs steps, timing each and merging their per-layer info."""

    def __init__(self, layers: dict, timings: dict):
        self.layers, self.timings = layers, timings

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 4)

    def run(self, name: str, fn, *args, **kwargs) -> Transformed:
        with self.timed(name):
            out = fn(*args, **kwargs)
        for layer, notes in out.info.items():
            self.layers.setdefault(layer, {}).update(notes)
        return out


def prepare(model: nn.Module, config: PipelineConfig, steps: _Steps) -> Transformed:
    """The float part: everything up to (not including) quantization."""
    with steps.timed("trace"):
        gm = trace(model)
        check_finite(gm)
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if m is not None:
            steps.layers[node.target] = {"type": type(m).__name__, "kind": layer_kind(m),
                                         "shape": list(m.weight.shape)}
    t = steps.run("fold_bn", fold_batchnorm, gm)
    if config.relu:
        t = steps.run("relu6", replace_relu6, t.gm, t.stats)
    if config.equalize:
        t = steps.run("equalize", equalize, t.gm, t.stats, config.equalization)
    if config.absorb:
        t = steps.run("absorb_bias", absorb_high_bias, t.gm, t.stats, config.absorb_std)
    if config.clip_weight:
        t = steps.run("clip_weight", clip_weights, t.gm, t.stats, config.clip_weight)
    return t


def quantize_model(model: nn.Module, config: PipelineConfig = PipelineConfig(),
                   calib_data: Iterable[torch.Tensor] | None = None) -> QuantizationResult:
    """Run the DFQ pipeline on a copy of `model`.

    `calib_data` (input batches, distilled or real) is needed only when config.needs_data:
    data-driven activation ranges (calib, distill_range) or empirical bias correction.
    """
    if config.needs_data and calib_data is None:
        raise ValueError("this config uses data (calib / distill_range / correction='data'): pass calib_data")
    from dfq.targets import resolve

    # the runtime profile (QuantConfig.target) becomes concrete grids; result.config records them
    config = dataclasses.replace(config, quant=resolve(config.quant))
    layers: dict[str, dict] = {}
    timings: dict[str, float] = {}
    steps = _Steps(layers, timings)
    t_start = time.perf_counter()
    with single_threaded():
        prepared = prepare(model, config, steps)
        result = QuantizationResult(prepared.gm, prepared.gm, prepared.stats, config, layers, {}, timings)
        if not config.quantize:
            timings["total"] = round(time.perf_counter() - t_start, 4)
            return result
        qc = config.quant
        with steps.timed("moments"):
            moments = propagate(prepared.gm, prepared.stats,
                                input_moments(config.input_mean, config.input_std), config.range_std)
        q = steps.run("quantize_weights", quantize_weights, prepared.gm, prepared.stats, qc)
        if config.correction == "bn":
            q = steps.run("bias_correction", correct_bias, q.gm, prepared.gm, prepared.stats, moments)
        with steps.timed("activation_ranges"):
            gm = insert_quantizers(q.gm, quantization_points(q.gm, qc), qc)
            if config.calib or config.distill_range:
                result.activations = calibrate(gm, calib_data, config.range_percentile)
                inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
                result.activations.update(set_ranges_from_moments(gm, moments, only=inputs))
            else:
                result.activations = set_ranges_from_moments(gm, moments)
            snap_clips_to_grid(gm)
        if config.correction == "data":
            with steps.timed("bias_correction"):
                for layer, notes in correct_bias_empirical_(gm, prepared.gm, calib_data).items():
                    layers.setdefault(layer, {}).update(notes)
        with steps.timed("quantize_bias"):
            for layer, notes in quantize_biases(gm, qc).items():
                layers.setdefault(layer, {}).update(notes)
        if qc.target == "ort":
            for layer in make_integer_exact_(gm):
                layers.setdefault(layer, {})["simulation"] = "integer-exact (as QLinearConv)"
        elif qc.target == "ncnn":
            for layer, how in make_ncnn_exact_(gm).items():
                layers.setdefault(layer, {})["simulation"] = f"integer-exact as ncnn; multipliers: {how}"
    result.model = gm
    timings["total"] = round(time.perf_counter() - t_start, 4)
    return result
