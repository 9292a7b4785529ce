"""Frozen configuration dataclasses: what a run does, serialisable to and from dicts (JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dfq.errors import DfqError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the one copy of ImageNet's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
# Distilled images carry a few far-out synthetic pixels, so their ranges use a percentile:
# MobileNetV2, 96.2 % agreement with FP32 against 94.8 % for min/max. Real images use min/max.
DISTILLED_PERCENTILE = 99.99
# What dfq.data.quantization_data.default_distill makes when no distillation is given (CLI and API)
DISTILL_SIDE = 112  # images for ranges at most this side (measured best; reconstruction: full)
DISTILL_BATCH_SIZE = 32  # images per batch
DISTILL_BATCHES = 2  # 2 x 32 images for activation ranges and equalization
DISTILL_BATCHES_RECONSTRUCT = 4  # and 4 x 32 for --reconstruct (benchmarks/reconstruct.md)
DISTILL_BATCHES_RECONSTRUCT_LOW_ACT = 6  # 6 x 32 when activations are below 8 bits (same)
AUTO = "auto"
# The paper's constants, one place each
RANGE_STD = 6.0  # BN-derived ranges: mean +- 6 std
# activation ranges: "mse", of least expected quantization error; "std": mean +- RANGE_STD std
RANGE_RULES = ("mse", "std")
# "auto": mse from the BN moments (it wins on every paired figure measured there:
# docs/results-classification.md, "Activation ranges"), std (min/max or a percentile) on data,
# where mse clips tails the network needs; --range_rule std keeps the paper's rows
RANGE_RULE = AUTO
# with the mse rule, the two operands of a residual add are taken as correlated by this much
# (the std rule keeps the paper's independent branches): on ResNet-56 independent branches
# underestimate the stream's spread 27 blocks deep (W8A8 logits SQNR 17.7 dB against 25.8 at
# 0.5), and 0.5 is within 0.1 dB of the best of 0 and 1 on MobileNetV2 and ResNet-56 alike
MSE_ADD_CORRELATION = 0.5
# high-bias absorption: c = max(0, beta - 6 gamma), exact on the whole range the std rule covers.
# The paper's 3 misses too often: MobileNetV2's float model moves (logits SQNR 24 dB against
# FP32, ReLU6 kept) and W8A8 loses 1.6 dB (docs/results-classification.md)
ABSORB_STD = RANGE_STD
CLIP_WEIGHT = 15.0  # --clip_weight without a value: clamp to [-15, 15]


@dataclass(frozen=True)
class Grid:
    """An integer grid: bit width and whether it is symmetric (signed, zero point 0)."""

    bits: int
    symmetric: bool

    def __post_init__(self):
        if not 2 <= self.bits <= 32:
            raise ValueError(f"bit width {self.bits} is out of range 2..32")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and grids. Defaults: W8 A8 per-tensor, symmetric weights, uint8-style
    asymmetric activations, int32 bias at s_weight * s_input (what int8 runtimes do)."""

    bits_weight: int = 8
    bits_activation: int = 8
    bits_bias: int = 32
    per_channel: bool = False
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    rounding: str = "half_even"
    # Runtime profile (dfq/runtimes): "generic" (as configured) or a runtime's, e.g. "ort"
    # (onnxruntime QDQ), "ncnn" (ncnn int8); the pipeline resolves it into the grids that runtime
    # computes with, and refuses a name dfq.runtimes.names() does not list.
    target: str = "generic"
    reduce_range: bool | None = (
        None  # fewer weight bits where the runtime needs them; None = by CPU
    )
    # Mixed precision (dfq.quant.mixed): the first and last weighted layers' weights and inputs
    # at this many bits (None: as the rest), then per-layer overrides (fnmatch pattern on the
    # module name, weight bits, input-activation bits or None), later ones winning.
    keep_first_last: int | None = None
    layer_bits: tuple[tuple[str, int, int | None], ...] = ()
    # The network input's quantizer (an image: 8-bit data). None: max(bits_activation, 8), as
    # a grid below the data's own precision only throws information away (W6A6 MobileNetV2:
    # +0.8 dB logits SQNR on each of four seeds; benchmarks/reconstruct.md, session 20);
    # AdaRound, BRECQ and QDrop do not quantize the input at all. keep_first_last / layer_bits
    # on the first layer's input still override it.
    input_bits: int | None = None

    def __post_init__(self):
        for name in ("bits_weight", "bits_activation", "input_bits", "keep_first_last"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 16:
                raise DfqError(f"--{name} {value} is out of range.", "use 2..16 bits")
        # lists (from JSON) become tuples, so the config stays hashable and comparable
        rules = tuple(
            (str(p), int(w), None if a is None else int(a)) for p, w, a in self.layer_bits
        )
        object.__setattr__(self, "layer_bits", rules)
        for pattern, w, a in rules:
            if not all(2 <= b <= 16 for b in (w, a) if b is not None):
                raise DfqError(
                    f"`layer_bits` {pattern}={w}{'' if a is None else f',{a}'}: bits out of range.",
                    "use 2..16 bits",
                )
        if self.bits_bias not in (8, 16, 32):
            raise DfqError(f"`bits_bias`={self.bits_bias} is not supported.", "use 8, 16 or 32")
        if self.rounding not in ("half_even", "half_away"):
            raise DfqError(
                f"`rounding`='{self.rounding}' is unknown.", "use half_even or half_away"
            )

    @property
    def lowest_activation_bits(self) -> int:
        """The fewest bits any activation quantizer is asked for: the model-wide width, the
        network input's, the first/last layers' and the per-layer overrides' (each pattern
        matches a layer, as dfq.quant.mixed.check_layer_bits makes sure before any
        distillation)."""
        widths = [self.bits_activation, self.network_input_bits, self.keep_first_last]
        widths += [a for _, _, a in self.layer_bits]
        return min(b for b in widths if b is not None)

    @property
    def network_input_bits(self) -> int:
        return self.input_bits if self.input_bits is not None else max(self.bits_activation, 8)

    @property
    def input_grid(self) -> Grid:
        """The grid of the network inputs' quantizers (see `input_bits`)."""
        return Grid(self.network_input_bits, self.activation_symmetric)

    @property
    def weight_grid(self) -> Grid:
        return Grid(self.bits_weight, self.weight_symmetric)

    @property
    def activation_grid(self) -> Grid:
        return Grid(self.bits_activation, self.activation_symmetric)

    @property
    def bias_grid(self) -> Grid:
        return Grid(self.bits_bias, True)


@dataclass(frozen=True)
class EqualizeConfig:
    max_iterations: int = 50
    threshold: float = 1e-3  # stop when every |log s_i| of a sweep is below this (0.1 %)
    activation_aware: bool = False  # balance the activation between the layers too
    activation_std: float = RANGE_STD  # its range from BN statistics: mean + n * std
    residual_regions: bool = (
        False  # also equalize around adds, concatenations and fan-outs (regions)
    )
    search: bool = False  # choose each pair's scale power on data (transforms.equalize_search)


@dataclass(frozen=True)
class ReconstructConfig:
    """Post-training reconstruction (dfq.transforms.reconstruct): per block, `iterations` Adam
    steps on batches of `batch_size` images decide the result; `seconds` (all blocks together)
    is only a cap, which warns when it cuts. AdaRound's soft rounding (`round_lr`, regulariser
    weight `round_weight`, beta annealed `beta` over the steps after `warmup`) and LSQ
    activation step sizes (`scale_lr`, on log scale). `fp_input_mix`: the share of input
    elements taken from the FP32 model instead of the quantized one (QDrop); `images`: at most
    this many images; `mirror`: learn on their mirror images too (left-right flipped; images
    only), which are new inputs for the FP32 model to be matched on at no distillation cost.
    `window`: learn each local block on spatial windows covering this share of each side of
    its output (dfq.graph.windows; None: whole maps), for more iterations in the same time."""

    iterations: int = 200
    batch_size: int = 32
    seconds: float | None = None
    round_lr: float = 1e-2
    round_weight: float = 0.01
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    scale_lr: float = 1e-3
    bias_lr: float = 1e-3
    learn_rounding: bool = True
    learn_scales: bool = True
    init_scales: bool = True  # start weight and activation scales at their least-MSE multiple
    fp_input_mix: float = 0.5
    images: int | None = None
    mirror: bool = True
    window: float | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "beta", tuple(float(b) for b in self.beta))
        if self.iterations < 0 or self.batch_size < 1:
            raise DfqError(
                f"`reconstruction.iterations`={self.iterations} / `reconstruction.batch_size`="
                f"{self.batch_size}: "
                "iterations must be >= 0 and the batch size >= 1."
            )
        if self.seconds is not None and not self.seconds > 0:
            raise DfqError(f"`reconstruction.seconds`={self.seconds} must be positive.")
        if not 0 <= self.fp_input_mix <= 1 or not 0 <= self.warmup < 1:
            raise DfqError(
                "`reconstruction.fp_input_mix` must be in [0, 1] and `reconstruction.warmup` in "
                "[0, 1)."
            )
        if self.window is not None and not 0 < self.window <= 1:
            raise DfqError(f"`reconstruction.window`={self.window} must be in (0, 1].")
        if not self.round_lr > 0 or not self.round_weight >= 0:
            raise DfqError(
                f"`reconstruction.round_lr`={self.round_lr} must be > 0 and "
                f"`reconstruction.round_weight`={self.round_weight} >= 0."
            )


@dataclass(frozen=True)
class PipelineConfig:
    """The DFQ pipeline, with the original experiments' switches as field names."""

    quantize: bool = True
    relu: bool = False  # replace ReLU6 by ReLU (explicit; changes the float model)
    equalize: bool = False  # cross-layer equalization
    absorption: bool | None = None  # high-bias absorption; None = on with --equalize
    correction: bool | str = (
        False  # True/"bn": data-free bias correction; "data": empirical, on data
    )
    clip_weight: float | None = None  # e.g. 15.0: clamp weights to [-15, 15]
    quant: QuantConfig = field(default_factory=QuantConfig)
    equalization: EqualizeConfig = field(default_factory=EqualizeConfig)
    range_std: float = RANGE_STD  # BN-based activation ranges: mean +- range_std * std
    # how activation ranges are chosen: "mse", least expected quantization error for each
    # quantizer's bit width (from the moments, or on the data's values); "std": mean +- range_std
    # std from the moments (the paper's), min/max or a percentile on data
    range_rule: str = RANGE_RULE
    # correct the next layer's bias for the mean shift of clipping and rounding each activation
    act_correction: bool = False
    absorb_std: float = ABSORB_STD  # high-bias absorption: c = max(0, beta - absorb_std * gamma)
    calib: int = 0  # >0: activation ranges from that many real images instead
    distill_range: bool = False  # activation ranges from the (distilled) data given to the pipeline
    true_data: int = 0  # >0: that many real images instead of distilled ones wherever data is used
    # data ranges at this percentile instead of min/max (None); "auto": DISTILLED_PERCENTILE for
    # distilled images, min/max for real ones
    range_percentile: float | None | str = AUTO
    # learn weight rounding and activation step sizes block by block on the data
    # (dfq.transforms.reconstruct)
    reconstruct: bool = False
    reconstruction: ReconstructConfig = field(default_factory=ReconstructConfig)
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    # refuse (DfqError) a result with any BN left unfolded, layer left unquantized or activation
    # quantizer left without a range (dfq.reporting.coverage names them)
    strict: bool = False
    # (C, H, W) the model will see: used only where a model traces with static shapes (dfq.graph
    # .trace's fallback); None: 3x224x224
    input_size: tuple[int, ...] | None = None

    def __post_init__(self):
        modes = {
            False: "",
            None: "",
            "": "",
            "none": "",
            True: "bn",
            "bn": "bn",
            "data": "data",
            "distill": "data",
        }
        if self.correction not in modes:
            raise DfqError(
                f"`correction`='{self.correction}' is unknown.", "use bn (data-free) or distill"
            )
        object.__setattr__(self, "correction", modes[self.correction])
        if self.range_rule == AUTO:
            on_data = bool(self.calib or self.distill_range)
            object.__setattr__(self, "range_rule", "std" if on_data else "mse")
        if self.range_rule not in RANGE_RULES:
            raise DfqError(
                f"`range_rule`='{self.range_rule}' is unknown.",
                f"use one of {(*RANGE_RULES, AUTO)}",
            )
        if self.act_correction and self.correction == "data":
            raise DfqError(
                "`act_correction` is data-free; empirical bias correction (`correction`='data') "
                "already measures the activations' mean shift.",
                "drop `act_correction`, or use `correction`='bn'",
            )
        if self.range_percentile == AUTO:
            distilled = self.distill_range and not (self.calib or self.true_data)
            distilled = distilled and self.range_rule != "mse"  # mse ranges the data itself
            object.__setattr__(
                self, "range_percentile", DISTILLED_PERCENTILE if distilled else None
            )
        if self.range_percentile is not None and not 50 < self.range_percentile <= 100:
            raise DfqError(
                f"`range_percentile`={self.range_percentile} must be in (50, 100].", "e.g. 99.99"
            )
        if self.absorption and not self.equalize:
            raise DfqError(
                "`absorption` needs `equalize` (it moves the biases equalization inflates).",
                "add `equalize`, or drop `absorption`",
            )
        if self.clip_weight is not None and not self.clip_weight > 0:
            raise DfqError(
                f"`clip_weight`={self.clip_weight} must be positive.", "e.g. `clip_weight`=15"
            )
        if self.range_std <= 0:
            raise DfqError(f"`range_std`={self.range_std} must be positive.")
        size = self.input_size
        if size is not None:
            if len(size) != 3 or not all(isinstance(n, int) and n > 0 for n in size):
                batch = len(size) == 4 and size[0] == 1
                raise DfqError(
                    f"`input_size`={tuple(size)} is not (C, H, W)"
                    + (": it has a batch dimension." if batch else "."),
                    f"give one image's shape, e.g. {tuple(size[1:]) if batch else (3, 224, 224)}",
                )
            object.__setattr__(self, "input_size", tuple(size))

    @property
    def needs_data(self) -> bool:
        """Whether the pipeline must be given input batches (distilled or real)."""
        return bool(
            self.calib
            or self.distill_range
            or self.correction == "data"
            or (self.reconstruct and self.quantize)
            or (self.equalize and self.equalization.search)
        )

    @property
    def absorb(self) -> bool:
        return self.equalize if self.absorption is None else self.absorption

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PipelineConfig":
        d = dict(d)
        d["quant"] = QuantConfig(**d.get("quant", {}))
        d["equalization"] = EqualizeConfig(**d.get("equalization", {}))
        d["reconstruction"] = ReconstructConfig(**d.get("reconstruction", {}))
        for k in ("input_mean", "input_std", "input_size"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
