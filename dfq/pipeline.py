"""The whole data-free pipeline as one call: trace -> fold BN -> ReLU6 policy -> equalize ->
absorb high bias -> clip -> quantize weights -> correct bias -> activation ranges -> biases.

Every step is also a public function of its own; this module only sequences them, times
them, and merges their per-layer notes into one report.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from dfq import targets
from dfq.config import PipelineConfig, QuantConfig
from dfq.graph.ops import layer_kind, weighted_module
from dfq.graph.trace import check_finite, trace
from dfq.quant.activations import (
    calibrate_,
    insert_quantizers,
    quantizer_nodes,
    set_ranges_from_moments_,
    snap_clips_to_grid_,
)
from dfq.quant.mixed import layer_bits, set_input_bits_
from dfq.quant.saved import restore_
from dfq.quant.weights import quantize_weights
from dfq.records import Transformed
from dfq.reporting.coverage import check_strict, coverage
from dfq.statistics.bn import Stats
from dfq.statistics.moments import Moments, input_moments, propagate
from dfq.targets.base import Profile
from dfq.transforms.bias_absorb import absorb_high_bias
from dfq.transforms.bias_correct import correct_bias, correct_bias_empirical_
from dfq.transforms.bn_fold import fold_batchnorm
from dfq.transforms.clip import clip_weights
from dfq.transforms.equalize import equalize
from dfq.transforms.equalize_search import search_scales_
from dfq.transforms.reconstruct import reconstruct
from dfq.transforms.relu6 import replace_relu6


@dataclass
class QuantizationResult:
    """What the pipeline made. `model` is what the config asks for: the fake-quant model, or
    with `quantize=False` the transformed float model (then it *is* `float_model`)."""

    model: fx.GraphModule
    float_model: fx.GraphModule  # after the float transforms, before quantization
    stats: Stats
    config: PipelineConfig
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # what was folded / quantized / ranged / equalized of the whole graph (dfq.reporting.coverage)
    coverage: dict[str, Any] = field(default_factory=dict)
    reconstruction: dict[str, dict[str, Any]] = field(default_factory=dict)  # per block


@contextlib.contextmanager
def single_threaded(n_threads: int = 1):
    """The transforms are thousands of tiny tensor ops: extra threads only add overhead
    (and stall badly when the cores are shared). Restores the caller's setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(n_threads)
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

    def run(self, name: str, fn, *args, into: dict | None = None) -> Transformed:
        """Run one step; its per-layer notes go into the layer report (or `into`)."""
        with self.timed(name):
            out = fn(*args)
        report = self.layers if into is None else into
        for layer, notes in out.info.items():
            report.setdefault(layer, {}).update(notes)
        return out


SEARCH_IMAGES = 64  # images the equalization search measures each pair's error on


def prepare(
    model: nn.Module,
    config: PipelineConfig,
    steps: _Steps,
    data: list[torch.Tensor] | None = None,
) -> Transformed:
    """The float part: everything up to (not including) quantization. `data` (input batches)
    lets equalization choose its scales on data when config.equalization.search is set."""
    with steps.timed("trace"):
        gm = trace(model, config.input_size)
        check_finite(gm)
    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if m is not None:
            steps.layers[node.target] = {
                "type": type(m).__name__,
                "kind": layer_kind(m),
                "shape": list(m.weight.shape),
            }
            if node.target in gm.meta.get("dfq_lifted", {}):
                steps.layers[node.target]["lifted"] = gm.meta["dfq_lifted"][node.target]
    t = steps.run("fold_bn", fold_batchnorm, gm)
    if config.relu:
        t = steps.run("relu6", replace_relu6, t.gm, t.stats)
    if config.equalize:
        search = None
        if config.equalization.search and data is not None:
            images = torch.cat([x.detach().cpu().float() for x in data])[:SEARCH_IMAGES]
            search = functools.partial(search_scales_, data=[images], quant=config.quant)
        t = steps.run("equalize", equalize, t.gm, t.stats, config.equalization, search)
    if config.absorb:
        t = steps.run("absorb_bias", absorb_high_bias, t.gm, t.stats, config.absorb_std)
    if config.clip_weight:
        t = steps.run("clip_weight", clip_weights, t.gm, t.stats, config.clip_weight)
    return t


def quantize_activations(
    gm: fx.GraphModule,
    stats: Stats,
    qc: QuantConfig,
    profile: Profile,
    moments: dict[str, Moments],
    data: Iterable[torch.Tensor] | None = None,
    percentile: float | None = None,
    input_bits: dict[str, int] | None = None,
    layer_notes: dict[str, dict] | None = None,
) -> Transformed:
    """A copy of `gm` with the profile's activation quantizers, ranged from the data-free
    `moments`, or from `data` when given (the network input's range then still comes from the
    normalisation constants, which give it exactly). `input_bits`: other widths for the
    quantizers some layers read (dfq.quant.mixed), whose `bits_input` go into `layer_notes`.
    Info: per quantized node."""
    gm = insert_quantizers(
        gm, profile.quantization_points(gm), qc, profile.reciprocal_scales, profile.reads_quantized
    )
    for layer, notes in set_input_bits_(gm, input_bits or {}).items():
        if layer_notes is not None:
            layer_notes.setdefault(layer, {}).update(notes)
    if data is not None:
        info = calibrate_(gm, data, percentile)
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        info.update(set_ranges_from_moments_(gm, moments, only=inputs))
    else:
        info = set_ranges_from_moments_(gm, moments)
    snap_clips_to_grid_(gm)
    for src, qnode in quantizer_nodes(gm).items():
        info.setdefault(src, {})["bits"] = gm.get_submodule(qnode.target).grid.bits
    return Transformed(gm, stats, info)


def on_copy(helper_: Callable[..., dict], gm: fx.GraphModule, stats: Stats, *args) -> Transformed:
    """A mutating helper (name ending in `_`, returning per-layer notes) as a step: it works on a
    copy of `gm`, so every step of the pipeline leaves its input untouched."""
    gm = copy.deepcopy(gm)
    return Transformed(gm, stats, helper_(gm, *args))


def quantize_model(
    model: nn.Module,
    config: PipelineConfig = PipelineConfig(),
    calib_data: Iterable[torch.Tensor] | None = None,
    progress: bool = False,
    restore: dict[str, Any] | None = None,
) -> QuantizationResult:
    """Run the DFQ pipeline on a copy of `model`.

    `calib_data` (input batches, distilled or real) is needed only when config.needs_data:
    data-driven activation ranges (calib, distill_range), empirical bias correction or
    reconstruction (whose progress bars `progress` shows). `restore`
    (dfq.quant.saved.load_quantized) puts a saved result in place of those data-driven steps:
    no data is needed then.
    """
    if config.needs_data and calib_data is None and restore is None:
        raise ValueError(
            "this config uses data (calib / distill_range / correction='data' / reconstruct): "
            "pass calib_data"
        )
    calib_data = list(calib_data) if calib_data is not None else None  # read more than once
    profile = targets.profile(config.quant.target)
    # the runtime profile becomes concrete grids; result.config records them
    config = dataclasses.replace(config, quant=profile.resolve(config.quant))
    qc = config.quant
    steps = _Steps({}, {})
    t_start = time.perf_counter()
    n_threads = torch.get_num_threads()
    with single_threaded():
        # a restored result carries the searched scales in its state: no data then
        prepared = prepare(model, config, steps, None if restore is not None else calib_data)
        result = QuantizationResult(
            prepared.gm, prepared.gm, prepared.stats, config, steps.layers, {}, steps.timings
        )
        if config.quantize:
            with steps.timed("moments"):
                moments = propagate(
                    prepared.gm,
                    prepared.stats,
                    input_moments(config.input_mean, config.input_std),
                    config.range_std,
                )
            mixed = layer_bits(prepared.gm, qc)
            t = steps.run(
                "quantize_weights",
                quantize_weights,
                prepared.gm,
                prepared.stats,
                qc,
                profile.weight_bits,
                {k: w for k, (w, _) in mixed.items() if w is not None},
            )
            if config.correction == "bn":
                t = steps.run(
                    "bias_correction", correct_bias, t.gm, prepared.gm, prepared.stats, moments
                )
            ranged_on_data = bool(config.calib or config.distill_range) and restore is None
            t = steps.run(
                "activation_ranges",
                quantize_activations,
                t.gm,
                t.stats,
                qc,
                profile,
                moments,
                calib_data if ranged_on_data else None,
                config.range_percentile,
                {k: a for k, (_, a) in mixed.items() if a is not None},
                steps.layers,
                into=result.activations,
            )
            if config.correction == "data" and restore is None:
                t = steps.run(
                    "bias_correction",
                    on_copy,
                    correct_bias_empirical_,
                    t.gm,
                    t.stats,
                    prepared.gm,
                    calib_data,
                )
            if restore is not None:
                t = steps.run("restore", on_copy, restore_, t.gm, t.stats, restore)
            elif config.reconstruct:
                with single_threaded(n_threads):  # big convolutions: the caller's threads
                    t = steps.run(
                        "reconstruct",
                        reconstruct,
                        t.gm,
                        t.stats,
                        prepared.gm,
                        calib_data,
                        config.reconstruction,
                        progress,
                        qc.bits_bias == 32 and profile.int32_bias_at_input_scale,
                        into=result.reconstruction,
                    )
            t = steps.run("quantize_bias", on_copy, profile.quantize_biases_, t.gm, t.stats, qc)
            t = steps.run(
                "simulation",
                on_copy,
                lambda gm: {k: {"simulation": v} for k, v in profile.make_exact_(gm).items()},
                t.gm,
                t.stats,
            )
            result.model = t.gm
        result.coverage = coverage(
            prepared.gm.meta.get("dfq_tracer", "torch.fx.symbolic_trace"),
            prepared.gm,
            result.model if config.quantize else None,
            result.layers,
            result.activations,
            config,
        )
    steps.timings["total"] = round(time.perf_counter() - t_start, 4)
    if config.strict:
        check_strict(result.coverage)
    return result
