"""The whole data-free pipeline as one call: trace -> fold BN -> ReLU6 policy -> equalize ->
absorb high bias -> clip -> quantize weights -> correct bias -> activation ranges -> biases.

Every step is also a public function of its own. Here each is wrapped in a step object
(`Step`: a `name`, the config slice it owns, whether it needs calibration data, and a call
`(state) -> Transformed`); `build_steps` lists them as a PipelineConfig asks, and `run_steps`
runs any such list with one loop that times each step and merges its per-layer notes into one
report. `quantize_model(..., steps=[...])` runs a list of the caller's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import fx, nn

from dfq import runtimes
from dfq.config import (
    MSE_ADD_CORRELATION,
    RANGE_RULE,
    EqualizeConfig,
    PipelineConfig,
    QuantConfig,
    ReconstructConfig,
)
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
from dfq.records import LayerRecord, Records, Transformed, merge_records
from dfq.reporting.coverage import check_strict, coverage
from dfq.runtimes.base import Profile
from dfq.statistics.bn import Stats
from dfq.statistics.moments import Moments, input_moments, propagate
from dfq.transforms.bias_absorb import absorb_high_bias
from dfq.transforms.bias_correct import (
    correct_activation_bias_,
    correct_bias,
    correct_bias_empirical_,
)
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
    layers: Records = field(default_factory=dict)
    activations: Records = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # what was folded / quantized / ranged / equalized of the whole graph (dfq.reporting.coverage)
    coverage: dict[str, Any] = field(default_factory=dict)
    reconstruction: Records = field(default_factory=dict)  # per block


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


# ---------------------------------------------------------------------------------------------
# The state the steps pass along, and the step protocol


@dataclass
class State:
    """What a step reads. `gm`/`stats`: the current graph and its BN statistics (None before
    `trace`). `float_gm`/`float_stats`: the float model the quantization steps compare against,
    set by `Moments` (the first quantization step). `layers`/`activations`/`reconstruction`:
    the reports the loop merges each step's info into; `extras`: free for user steps."""

    model: nn.Module
    config: PipelineConfig
    profile: Profile
    data: list[torch.Tensor] | None = None
    progress: bool = False
    n_threads: int = 1  # the caller's threads (the pipeline itself runs single-threaded)
    gm: fx.GraphModule | None = None
    stats: Stats | None = None
    float_gm: fx.GraphModule | None = None
    float_stats: Stats | None = None
    moments: dict[str, Moments] | None = None
    layers: Records = field(default_factory=dict)
    activations: Records = field(default_factory=dict)
    reconstruction: Records = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def mixed(self) -> dict[str, tuple[int | None, int | None]]:
        """Per-layer (weight, input) widths of the float model (dfq.quant.mixed.layer_bits)."""
        return layer_bits(self.float_gm, self.config.quant)


@runtime_checkable
class Step(Protocol):
    """One pipeline step. `name` is its timing key; `needs_data` says it cannot run without
    calibration data; `report` names the State report its info is merged into. Called with the
    state, it returns the new graph, statistics and per-layer info (name -> LayerRecord, each
    merged into the report's record of that name: LayerRecord.merge); it must not mutate
    `state.gm` (work on a copy)."""

    name: str
    needs_data: bool
    report: Literal["layers", "activations", "reconstruction"]

    def __call__(self, state: State) -> Transformed: ...


class FloatStep:
    """Base of the built-in steps: class-level defaults for the protocol's attributes."""

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False
    report: ClassVar[str] = "layers"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def run_steps(steps: Sequence[Step], state: State) -> State:
    """Run `steps` in order on `state`: time each (state.timings[step.name]), merge its info
    into the report it names, and hand its graph and statistics to the next."""
    for step in steps:
        if step.needs_data and state.data is None:
            raise ValueError(f"step {step.name!r} uses calibration data: pass calib_data")
        t = time.perf_counter()
        out = step(state)
        state.timings[step.name] = round(time.perf_counter() - t, 4)
        merge_records(getattr(state, step.report), out.info)
        state.gm, state.stats = out.gm, out.stats
    return state


# ---------------------------------------------------------------------------------------------
# The float steps


@dataclass(repr=False)
class Trace(FloatStep):
    """Trace the model (at the config's input size); info: each weighted layer's type, kind,
    weight shape, and how it was lifted to a module when it was a functional call."""

    input_size: tuple[int, ...]
    name: ClassVar[str] = "trace"

    def __call__(self, state: State) -> Transformed:
        gm = trace(state.model, self.input_size)
        check_finite(gm)
        info: Records = {}
        lifted = gm.meta.get("dfq_lifted", {})
        for node in gm.graph.nodes:
            m = weighted_module(gm, node)
            if m is not None:
                rec = LayerRecord(
                    type=type(m).__name__, kind=layer_kind(m), shape=list(m.weight.shape)
                )
                if node.target in lifted:
                    rec.lifted = lifted[node.target]
                info[node.target] = rec
        return Transformed(gm, {}, info)


@dataclass(repr=False)
class FoldBN(FloatStep):
    name: ClassVar[str] = "fold_bn"

    def __call__(self, state: State) -> Transformed:
        return fold_batchnorm(state.gm)


@dataclass(repr=False)
class ReplaceReLU6(FloatStep):
    name: ClassVar[str] = "relu6"

    def __call__(self, state: State) -> Transformed:
        return replace_relu6(state.gm, state.stats)


SEARCH_IMAGES = 64  # images the equalization search measures each pair's error on


@dataclass(repr=False)
class Equalize(FloatStep):
    """Cross-layer equalization; with `search` (and data at hand) the scales are then searched
    on up to SEARCH_IMAGES images at the `quant` grids."""

    config: EqualizeConfig
    quant: QuantConfig
    search: bool = False
    name: ClassVar[str] = "equalize"

    def __call__(self, state: State) -> Transformed:
        search = None
        if self.search and state.data is not None:
            images = torch.cat([x.detach().cpu().float() for x in state.data])[:SEARCH_IMAGES]
            search = functools.partial(search_scales_, data=[images], quant=self.quant)
        return equalize(state.gm, state.stats, self.config, search)


@dataclass(repr=False)
class AbsorbBias(FloatStep):
    std: float
    name: ClassVar[str] = "absorb_bias"

    def __call__(self, state: State) -> Transformed:
        return absorb_high_bias(state.gm, state.stats, self.std)


@dataclass(repr=False)
class ClipWeights(FloatStep):
    limit: float
    name: ClassVar[str] = "clip_weight"

    def __call__(self, state: State) -> Transformed:
        return clip_weights(state.gm, state.stats, self.limit)


# ---------------------------------------------------------------------------------------------
# The quantization steps


@dataclass(repr=False)
class PropagateMoments(FloatStep):
    """Marks the end of the float part (state.float_gm / float_stats) and propagates the
    data-free activation moments from the input normalisation through it."""

    input_mean: Sequence[float]
    input_std: Sequence[float]
    range_std: float
    add_correlation: float = 0.0
    name: ClassVar[str] = "moments"

    def __call__(self, state: State) -> Transformed:
        state.float_gm, state.float_stats = state.gm, state.stats
        inputs = input_moments(self.input_mean, self.input_std)
        state.moments = propagate(
            state.gm, state.stats, inputs, self.range_std, self.add_correlation
        )
        return Transformed(state.gm, state.stats, {})


@dataclass(repr=False)
class QuantizeWeights(FloatStep):
    quant: QuantConfig
    name: ClassVar[str] = "quantize_weights"

    def __call__(self, state: State) -> Transformed:
        bits = {k: w for k, (w, _) in state.mixed.items() if w is not None}
        return quantize_weights(
            state.float_gm, state.float_stats, self.quant, state.profile.weight_bits, bits
        )


@dataclass(repr=False)
class CorrectBias(FloatStep):
    """Bias correction from the BN statistics (data-free)."""

    name: ClassVar[str] = "bias_correction"

    def __call__(self, state: State) -> Transformed:
        return correct_bias(state.gm, state.float_gm, state.float_stats, state.moments)


def quantize_activations(
    gm: fx.GraphModule,
    stats: Stats,
    qc: QuantConfig,
    profile: Profile,
    moments: dict[str, Moments],
    data: Iterable[torch.Tensor] | None = None,
    percentile: float | None = None,
    input_bits: dict[str, int] | None = None,
    layer_notes: Records | None = None,
    rule: str = RANGE_RULE,
) -> Transformed:
    """A copy of `gm` with the profile's activation quantizers, ranged from the data-free
    `moments`, or from `data` when given (the network input's range then still comes from the
    normalisation constants, which give it exactly). `input_bits`: other widths for the
    quantizers some layers read (dfq.quant.mixed), whose `bits_input` go into `layer_notes`.
    `rule`: PipelineConfig.range_rule. Info: per quantized node."""
    gm = insert_quantizers(
        gm, profile.quantization_points(gm), qc, profile.reciprocal_scales, profile.reads_quantized
    )
    input_notes = set_input_bits_(gm, input_bits or {})
    if layer_notes is not None:
        merge_records(layer_notes, input_notes)
    if data is not None:
        info = calibrate_(gm, data, percentile, rule)
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        info.update(set_ranges_from_moments_(gm, moments, only=inputs))
    else:
        info = set_ranges_from_moments_(gm, moments, rule=rule)
    snap_clips_to_grid_(gm)
    for src, qnode in quantizer_nodes(gm).items():
        info.setdefault(src, LayerRecord()).bits = gm.get_submodule(qnode.target).grid.bits
    return Transformed(gm, stats, info)


@dataclass(repr=False)
class ActivationRanges(FloatStep):
    """Insert the activation quantizers; ranged on the calibration data when `on_data`, else
    from the moments. Info goes to the activations report (`bits_input` to the layers')."""

    quant: QuantConfig
    on_data: bool = False
    percentile: float | None = None
    rule: str = RANGE_RULE
    name: ClassVar[str] = "activation_ranges"
    report: ClassVar[str] = "activations"

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        return self.on_data

    def __call__(self, state: State) -> Transformed:
        return quantize_activations(
            state.gm,
            state.stats,
            self.quant,
            state.profile,
            state.moments,
            state.data if self.on_data else None,
            self.percentile,
            {k: a for k, (_, a) in state.mixed.items() if a is not None},
            state.layers,
            self.rule,
        )


@dataclass(repr=False)
class CorrectActivationBias(FloatStep):
    """Data-free correction of the mean shift each activation quantizer introduces (clipping
    and the rounding of clipped masses), from the moments."""

    name: ClassVar[str] = "activation_bias_correction"

    def __call__(self, state: State) -> Transformed:
        return on_copy(correct_activation_bias_, state.gm, state.stats, state.moments)


def on_copy(
    helper_: Callable[..., Records], gm: fx.GraphModule, stats: Stats, *args
) -> Transformed:
    """A mutating helper (name ending in `_`, returning per-layer notes) as a step: it works on a
    copy of `gm`, so every step of the pipeline leaves its input untouched."""
    gm = copy.deepcopy(gm)
    return Transformed(gm, stats, helper_(gm, *args))


@dataclass(repr=False)
class CorrectBiasOnData(FloatStep):
    """Empirical bias correction: the quantized layers' output means matched to the float
    model's on the calibration data."""

    name: ClassVar[str] = "bias_correction"
    needs_data: ClassVar[bool] = True

    def __call__(self, state: State) -> Transformed:
        return on_copy(correct_bias_empirical_, state.gm, state.stats, state.float_gm, state.data)


@dataclass(repr=False)
class Restore(FloatStep):
    """Put a saved result (dfq.quant.saved.load_quantized) in place of the data-driven steps."""

    saved: dict[str, Any]
    name: ClassVar[str] = "restore"

    def __repr__(self) -> str:
        return "Restore(...)"

    def __call__(self, state: State) -> Transformed:
        return on_copy(restore_, state.gm, state.stats, self.saved)


@dataclass(repr=False)
class Reconstruct(FloatStep):
    """Block reconstruction on the calibration data (with the caller's threads: big
    convolutions). Info goes to the reconstruction report."""

    config: ReconstructConfig
    int32_bias: bool = True
    name: ClassVar[str] = "reconstruct"
    needs_data: ClassVar[bool] = True
    report: ClassVar[str] = "reconstruction"

    def __call__(self, state: State) -> Transformed:
        with single_threaded(state.n_threads):
            return reconstruct(
                state.gm,
                state.stats,
                state.float_gm,
                state.data,
                self.config,
                state.progress,
                self.int32_bias,
            )


@dataclass(repr=False)
class QuantizeBias(FloatStep):
    quant: QuantConfig
    name: ClassVar[str] = "quantize_bias"

    def __call__(self, state: State) -> Transformed:
        return on_copy(state.profile.quantize_biases_, state.gm, state.stats, self.quant)


@dataclass(repr=False)
class Simulation(FloatStep):
    """Make the fake-quant model compute what the target runtime computes (profile.make_exact_)."""

    name: ClassVar[str] = "simulation"

    def __call__(self, state: State) -> Transformed:
        def exact_(gm: fx.GraphModule) -> Records:
            return {k: LayerRecord(simulation=v) for k, v in state.profile.make_exact_(gm).items()}

        return on_copy(exact_, state.gm, state.stats)


# ---------------------------------------------------------------------------------------------
# The default list, and the one call


def build_steps(
    config: PipelineConfig, profile: Profile, restore: dict[str, Any] | None = None
) -> list[Step]:
    """The steps `config` asks for, in order (config.quant already resolved by `profile`).
    `restore`: a saved result replaces the data-driven steps (then none of them needs data)."""
    qc = config.quant
    steps: list[Step] = [Trace(config.input_size), FoldBN()]
    if config.relu:
        steps.append(ReplaceReLU6())
    if config.equalize:
        # a restored result carries the searched scales in its state: no search then
        search = bool(config.equalization.search) and restore is None
        steps.append(Equalize(config.equalization, qc, search))
    if config.absorb:
        steps.append(AbsorbBias(config.absorb_std))
    if config.clip_weight:
        steps.append(ClipWeights(config.clip_weight))
    if not config.quantize:
        return steps
    steps += [
        PropagateMoments(
            config.input_mean,
            config.input_std,
            config.range_std,
            MSE_ADD_CORRELATION if config.range_rule == "mse" else 0.0,
        ),
        QuantizeWeights(qc),
    ]
    if config.correction == "bn":
        steps.append(CorrectBias())
    ranged_on_data = bool(config.calib or config.distill_range) and restore is None
    steps.append(ActivationRanges(qc, ranged_on_data, config.range_percentile, config.range_rule))
    if config.act_correction:
        steps.append(CorrectActivationBias())
    if config.correction == "data" and restore is None:
        steps.append(CorrectBiasOnData())
    if restore is not None:
        steps.append(Restore(restore))
    elif config.reconstruct:
        int32_bias = qc.bits_bias == 32 and profile.int32_bias_at_input_scale
        steps.append(Reconstruct(config.reconstruction, int32_bias))
    steps += [QuantizeBias(qc), Simulation()]
    return steps


def quantize_model(
    model: nn.Module,
    config: PipelineConfig = PipelineConfig(),
    calib_data: Iterable[torch.Tensor] | None = None,
    progress: bool = False,
    restore: dict[str, Any] | None = None,
    steps: Sequence[Step] | Callable[[list[Step]], Sequence[Step]] | None = None,
) -> QuantizationResult:
    """Run the DFQ pipeline on a copy of `model`.

    `calib_data` (input batches, distilled or real) is needed only when config.needs_data:
    data-driven activation ranges (calib, distill_range), empirical bias correction or
    reconstruction (whose progress bars `progress` shows). `restore`
    (dfq.quant.saved.load_quantized) puts a saved result in place of those data-driven steps:
    no data is needed then.

    `steps`: the steps to run instead of `build_steps(config, profile, restore)`: a list, or a
    function given that default list that returns the one to run. The first must trace (its
    state.gm is None); the float model is the graph at the `moments` step (or the last graph
    when no step is named so).
    """
    if config.needs_data and calib_data is None and restore is None:
        raise ValueError(
            "this config uses data (calib / distill_range / correction='data' / reconstruct): "
            "pass calib_data"
        )
    calib_data = list(calib_data) if calib_data is not None else None  # read more than once
    profile = runtimes.profile(config.quant.target)
    # the runtime profile becomes concrete grids; result.config records them
    config = dataclasses.replace(config, quant=profile.resolve(config.quant))
    default = build_steps(config, profile, restore)
    if steps is None:
        steps = default
    elif callable(steps):
        steps = steps(default)
    state = State(model, config, profile, calib_data, progress, torch.get_num_threads())
    t_start = time.perf_counter()
    with single_threaded():
        run_steps(steps, state)
        float_gm = state.float_gm if state.float_gm is not None else state.gm
        float_stats = state.float_stats if state.float_gm is not None else state.stats
        result = QuantizationResult(
            state.gm if config.quantize else float_gm,
            float_gm,
            float_stats,
            config,
            state.layers,
            state.activations,
            state.timings,
            reconstruction=state.reconstruction,
        )
        result.coverage = coverage(
            float_gm.meta.get("dfq_tracer", "torch.fx.symbolic_trace"),
            float_gm,
            result.model if config.quantize else None,
            result.layers,
            result.activations,
            config,
        )
    state.timings["total"] = round(time.perf_counter() - t_start, 4)
    if config.strict:
        check_strict(result.coverage)
    return result
