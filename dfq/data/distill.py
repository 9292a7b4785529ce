"""Distilled data: synthetic inputs whose per-layer statistics match the BN running stats.

Used where no real images are available to calibrate activation ranges, choose equalization
scales or reconstruct low-bit layers. The images are optimised (Adam, the model frozen) so that,
at the input of every BatchNorm2d, their per-channel mean and std equal the BN's running mean and
std, and the input itself has mean 0 and std 1 per channel; each term is a squared L2 norm over
channels.

Two choices decide whether the images are good enough for reconstruction below 8 bits
(benchmarks/reconstruct.md): the statistics are those of the batch, as BN's own are
(DeepInversion, GDFQ), not of every image (ZeroQ), so images may differ in colour and content;
and the optimised variable is a 1/f-scaled spectrum started from smooth noise, not the pixels,
so the images keep the smoothness of natural ones. ZeroQ's per-image matching of uniform noise
pixels (`stats="image", param="pixels"`) gives images 30x rougher than real ones with almost no
difference between images, on which MobileNetV2 W4A8 reconstruction gains nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfq.config import IMAGENET_MEAN, IMAGENET_STD
from dfq.errors import DfqError
from dfq.utils.distributed import gather_batches, mine, world
from dfq.utils.memory_format import set_memory_format_

_FORMAT = "dfq-distilled-v1"
log = logging.getLogger("dfq")


@dataclass(frozen=True)
class DistillConfig:
    """How much synthetic data to make and how hard to optimise it.

    `iterations` steps per batch (0 returns the initialisation, a useful baseline) decide the
    images, so a seed gives the same images on any machine; `threshold_factor` > 0 stops a
    batch early once its loss is below that times (BN layers + 1) (for ZeroQ-style images; off
    by default: the defaults were measured with all 150 steps);
    `patience` is the plateau length after which the learning rate drops tenfold;
    `seconds` is only a wall-clock cap for all batches together (None, the default: none);
    a batch it cuts is named in `DistillResult.cut` and warned about, since its images then
    depend on the machine's speed and load;
    `resolution` (H, W) None means the spatial size of the `input_shape` given to `distill`.
    `label_loss` > 0 (classifiers only) adds that weight times the cross-entropy of the output
    against a label drawn per image (class-conditioned images, as in GDFQ and Genie), and
    `jitter` rolls the batch by a seeded random offset each step (DeepInversion's jitter), so
    the images are more diverse and more like the classes than BN matching alone makes them.
    """

    batch_size: int = 64
    num_batches: int = 8
    resolution: tuple[int, int] | None = None
    iterations: int = 150
    lr: float | None = None  # None: 0.01 for the spectrum, 0.1 for pixels
    patience: int = 100
    threshold_factor: float = 0.0
    seconds: float | None = None
    seed: int = 0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    label_loss: float = 0.0  # weight of a cross-entropy towards a seeded label per image
    jitter: int = 0  # each step sees the images rolled by up to this many pixels (x and y)
    stats: str = "batch"  # "batch": the batch's statistics match BN's; "image": each image's
    param: str = "fourier"  # "fourier": a 1/f-scaled spectrum from smooth noise; "pixels"

    def __post_init__(self):
        for name in ("batch_size", "num_batches"):
            if getattr(self, name) < 1:
                raise DfqError(f"DistillConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.iterations < 0 or self.patience < 0:
            raise DfqError("DistillConfig.iterations and .patience must be >= 0.")
        if self.lr is not None and not self.lr > 0:
            raise DfqError(f"DistillConfig.lr must be > 0, got {self.lr}.")
        if self.seconds is not None and not self.seconds > 0:
            raise DfqError(f"DistillConfig.seconds must be > 0 or None, got {self.seconds}.")
        if self.label_loss < 0 or self.jitter < 0:
            raise DfqError("DistillConfig.label_loss and .jitter must be >= 0.")
        if self.stats not in ("batch", "image"):
            raise DfqError(f"DistillConfig.stats must be 'batch' or 'image', got {self.stats!r}.")
        if self.param not in ("fourier", "pixels"):
            raise DfqError(
                f"DistillConfig.param must be 'fourier' or 'pixels', got {self.param!r}."
            )
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise DfqError(f"DistillConfig.resolution must be (H, W), got {self.resolution}.")
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise DfqError(
                f"DistillConfig.mean {self.mean} and .std {self.std} must have one entry per "
                "input channel, with std > 0."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DfqError(f"Unknown DistillConfig keys {unknown}.", f"use only {sorted(names)}")
        d = dict(d)
        for key in ("resolution", "mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# What each use was measured best with (README, benchmarks/reconstruct.md). Activation ranges
# alone: ZeroQ's images (MobileNetV2 W8A8 per-tensor +0.15 / SQNR 17.8 dB, against -0.85 /
# 16.3 dB with the reconstruction images). Reconstruction: batch statistics on a spectrum,
# class-conditioned where the model is a classifier (W4A8 -2.31, against -15.5 with ZeroQ's).
FOR_RANGES = dict(
    stats="image", param="pixels", iterations=500, threshold_factor=5.0, label_loss=0.0, jitter=0
)
FOR_RECONSTRUCTION = dict(
    stats="batch", param="fourier", iterations=150, threshold_factor=0.0, label_loss=1.0, jitter=2
)


def preset(reconstruct: bool, classifier: bool = True) -> dict:
    """The DistillConfig fields measured best for reconstruction, or else for ranges; the
    class-conditioned loss needs a classifier's (N, classes) output."""
    fields = dict(FOR_RECONSTRUCTION if reconstruct else FOR_RANGES)
    if not classifier:
        fields["label_loss"] = 0.0
    return fields


@dataclass(frozen=True)
class DistillResult:
    """The distilled images and what it took: per-batch final BN-matching loss and step count.

    `config` has `resolution` filled in, so saving it records exactly what was made.
    """

    data: torch.Tensor
    losses: tuple[float, ...]
    iterations: tuple[int, ...]
    seconds: float
    bn_layers: int
    config: DistillConfig
    cut: tuple[int, ...] = ()  # batches the `seconds` cap stopped before the steps or threshold

    @property
    def threshold(self) -> float:
        return self.config.threshold_factor * (self.bn_layers + 1)


def _stat_distance(
    mu: torch.Tensor, var: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """||mean - mu||^2 + ||std - sigma||^2 for sigma = sqrt(var + 1e-6), from population
    variances, so a 1x1 feature map gives std sqrt(eps), never NaN."""
    return (mu - mean).square().sum() + (torch.sqrt(var + 1e-6) - std).square().sum()


def _image_stat_loss(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """ZeroQ's: every image's per-channel statistics, the distance averaged over the images."""
    var, mu = torch.var_mean(x.flatten(2), dim=-1, correction=0)
    return _stat_distance(mu, var, mean, std) / x.shape[0]


class _ChannelMoments(torch.autograd.Function):
    """Per-channel population variance and mean of an (N, C, ...) batch without autograd's
    temporaries, and a backward of one fused pass: autograd's var_mean made half of a
    distillation step's time (MobileNetV2, 2 cores).

    E[x^2] - mean^2 is summed in float64; BN inputs have |mean| of a few std at most.
    """

    @staticmethod
    def forward(ctx, x):
        channels = x.shape[1]
        n = x.numel() // channels
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            # a (positions, channels) view; squares summed in cache-sized row blocks, since
            # column reductions over it are slow and x.square() of it is a large temporary
            total = torch.zeros(channels, dtype=torch.float64, device=x.device)
            square = torch.zeros_like(total)
            for rows in x.permute(0, 2, 3, 1).reshape(n, channels).split(max(1, 2**18 // channels)):
                total += rows.sum(0)
                square += rows.square().sum(0)
            mean = total / n
        else:
            dims = (0, *range(2, x.dim()))
            mean = x.mean(dims).double()
            square = torch.linalg.vector_norm(x, dim=dims).double().square()
        var = (square / n - mean.square()).clamp_min(0)
        mean = mean.to(x.dtype)
        ctx.save_for_backward(x, mean)
        return var.to(x.dtype), mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        x, mean = ctx.saved_tensors
        n = x.numel() // x.shape[1]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = (2.0 / n) * grad_var
        b = grad_mean / n - a * mean
        return torch.addcmul(b.view(shape), x, a.view(shape))


def _batch_stat_loss(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The batch's per-channel statistics (over images and positions), which is what BN's
    running statistics estimate."""
    var, mu = _ChannelMoments.apply(x)
    return _stat_distance(mu, var, mean, std)


def _label_loss(out, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's (N, classes) output against `labels` (modulo classes)."""
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DfqError(
            "`distill.label_loss` needs a classifier with one (N, classes) output; this "
            f"model returns {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else ""),
            "set `distill.label_loss` to 0 for this model",
        )
    return nn.functional.cross_entropy(out, labels.to(out.device) % out.shape[1])


def _initial_batch(
    shape: tuple[int, ...], mean: torch.Tensor, std: torch.Tensor, gen
) -> torch.Tensor:
    """Uniform pixels 0..255 through the normalisation: spread over the whole valid input range."""
    pixels = torch.randint(0, 256, shape, generator=gen, dtype=torch.int64).to(torch.float32)
    return (pixels / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def _smooth_batch(shape: tuple[int, ...], gen) -> torch.Tensor:
    """Unit normal noise at 1/16 of the size, upsampled bilinearly: each image starts with its
    own colours and large shapes, as natural images have, and no pixel noise."""
    n, c, h, w = shape
    coarse = torch.randn((n, c, max(1, h // 16) + 1, max(1, w // 16) + 1), generator=gen)
    return nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)


class _Pixels(nn.Module):
    """Images as their pixels (ZeroQ): Adam moves every pixel by about the learning rate."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.pixels = nn.Parameter(x.clone())

    def forward(self) -> torch.Tensor:
        return self.pixels


class _Spectrum(nn.Module):
    """Images as a spectrum scaled by 1/frequency (feature visualisation's parametrisation):
    Adam's steps, of one size for every parameter, then change coarse shapes more than pixels,
    so the images keep the 1/f spectrum of natural ones instead of gathering pixel noise."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        h, w = x.shape[-2:]
        fy = torch.fft.fftfreq(h, dtype=x.dtype).abs().view(-1, 1)
        fx = torch.fft.rfftfreq(w, dtype=x.dtype).view(1, -1)
        freq = torch.sqrt(fy.square() + fx.square()).clamp_min(1.0 / max(h, w))
        self.register_buffer("scale", 1.0 / freq)
        self.size = (h, w)
        spec = torch.fft.rfft2(x, norm="ortho") / self.scale
        self.spec = nn.Parameter(torch.view_as_real(spec).contiguous())

    def forward(self) -> torch.Tensor:
        spec = torch.view_as_complex(self.spec) * self.scale
        return torch.fft.irfft2(spec, s=self.size, norm="ortho")


def _frozen_copy(model: nn.Module) -> tuple[nn.Module, list[nn.BatchNorm2d]]:
    """A deepcopy in eval mode without parameter gradients, and its BN layers with running stats."""
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    bns = [
        m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]
    if not bns:
        raise DfqError(
            "The model has no BatchNorm2d layer with running statistics, so there is nothing to "
            "distil data from (was BN already folded?).",
            "pass the float model before BN folding, or use BN-based or real-data "
            "activation ranges",
        )
    return frozen, bns


def distill(
    model: nn.Module,
    config: DistillConfig = DistillConfig(),
    input_shape: tuple[int, int, int] = (3, 224, 224),
    progress: bool = True,
    device: torch.device | str | None = None,
) -> DistillResult:
    """Distil `batch_size * num_batches` inputs of shape (C, H, W) from the model's BN statistics.

    Needs the BN-unfolded float model; layers without BN are simply not matched. The model is
    never modified (a frozen deepcopy is used); the images come back on the CPU. Deterministic
    for a given seed unless the `seconds` cap cuts batches short, which warns; the cap is shared
    evenly (unused time carries over) and checked after each step, so every batch gets at least
    one step.
    Under torchrun every process draws every batch's initial noise from the one seeded generator
    and optimises every N-th batch; the batches are gathered in order, so the images equal a
    single process's (with the same number of threads per process).
    """
    from tqdm.auto import tqdm

    channels = input_shape[0]
    height, width = config.resolution or tuple(input_shape[1:])
    if len(config.mean) != channels:
        raise DfqError(
            f"The input has {channels} channels but the normalisation mean/std has "
            f"{len(config.mean)}.",
            "set DistillConfig.mean and .std to the model's normalisation",
        )
    fourier = config.param == "fourier"
    lr = config.lr or (0.01 if fourier else 0.1)
    config = dataclasses.replace(config, resolution=(height, width), lr=lr)
    frozen, bns = _frozen_copy(model)
    set_memory_format_(frozen, torch.channels_last)
    if device is not None:  # e.g. a GPU: the model stays where it is, its frozen copy moves
        frozen.to(device)
    ref = next(frozen.parameters(), bns[0].running_mean)
    device, dtype = ref.device, ref.dtype
    targets = {
        bn: (bn.running_mean.detach().clone(), torch.sqrt(bn.running_var + bn.eps).detach())
        for bn in bns
    }
    terms: list[torch.Tensor] = []

    stat_loss = _batch_stat_loss if config.stats == "batch" else _image_stat_loss

    def hook(bn, inputs):
        terms.append(stat_loss(inputs[0], *targets[bn]))

    handles = [bn.register_forward_pre_hook(hook) for bn in bns]
    mean = torch.tensor(config.mean, device=device, dtype=dtype)
    std = torch.tensor(config.std, device=device, dtype=dtype)
    zeros, ones = torch.zeros_like(mean), torch.ones_like(mean)
    threshold = config.threshold_factor * (len(bns) + 1)
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.batch_size, channels, height, width)
    owned = mine(config.num_batches)  # all batches in one process; every N-th under torchrun
    records = []
    start = time.perf_counter()
    bar = tqdm(total=len(owned) * config.iterations, desc="distill", disable=not progress)
    try:
        for b in range(config.num_batches):
            deadline = (
                None
                if config.seconds is None
                else start + config.seconds * (b + 1) / config.num_batches
            )
            # drawn by every process: same seeds
            if fourier:
                x = _smooth_batch(shape, gen)
            else:
                x = _initial_batch(shape, mean.cpu(), std.cpu(), gen)
            # drawn only when used, so the default images stay what they were
            if config.label_loss:
                labels = torch.randint(0, 1 << 30, (config.batch_size,), generator=gen)
            if config.jitter:
                shifts = torch.randint(
                    -config.jitter, config.jitter + 1, (config.iterations, 2), generator=gen
                )
            if b not in owned:
                continue
            x = x.to(device, dtype)
            image = _Spectrum(x) if fourier else _Pixels(x)
            opt = torch.optim.Adam(image.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, patience=config.patience, min_lr=1e-4
            )
            loss_value, steps, cut = math.nan, 0, False
            while steps < config.iterations:
                terms.clear()
                x = image()
                seen = x
                if config.jitter:
                    dy, dx = shifts[steps].tolist()
                    seen = torch.roll(x, (dy, dx), dims=(2, 3))
                out = frozen(seen.contiguous(memory_format=torch.channels_last))
                bn_loss = sum(terms) + stat_loss(x, zeros, ones)
                loss = bn_loss
                if config.label_loss:
                    loss = loss + config.label_loss * _label_loss(out, labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # the early stop (and `losses`) judge the BN-statistics match alone: the label
                # term would otherwise keep a 1000-class model from ever stopping
                loss_value = bn_loss.item()
                sched.step(loss.item())
                steps += 1
                bar.update(1)
                bar.set_postfix(batch=f"{b + 1}/{config.num_batches}", loss=f"{loss_value:.3g}")
                converged = loss_value <= threshold
                cut = not converged and deadline is not None and time.perf_counter() >= deadline
                if converged or cut:
                    bar.total -= config.iterations - steps
                    bar.refresh()
                    break
            cut = cut and steps < config.iterations
            with torch.no_grad():
                x = image().detach().cpu()  # after the last step
            records.append((x, loss_value, steps, b if cut else None))
    finally:
        bar.close()
        for h in handles:
            h.remove()
    records = gather_batches(records, owned if world()[1] > 1 else None)
    result = DistillResult(
        data=torch.cat([r[0] for r in records]),
        losses=tuple(r[1] for r in records),
        iterations=tuple(r[2] for r in records),
        seconds=time.perf_counter() - start,
        bn_layers=len(bns),
        config=config,
        cut=tuple(r[3] for r in records if r[3] is not None),
    )
    if result.cut:
        _warn_cut(result)
    return result


def _warn_cut(result: DistillResult) -> None:
    """Say loudly that the time cap, not the steps, decided these images."""
    c = result.config
    steps = [result.iterations[b] for b in result.cut]
    msg = (
        f"`distill.seconds`={c.seconds:g} cut {len(result.cut)} of {c.num_batches} distillation "
        f"batches after {min(steps)}-{max(steps)} of {c.iterations} steps, above the early-stop "
        f"loss {result.threshold:g} (final {max(result.losses[b] for b in result.cut):.4g}): "
        "these images depend on this machine's speed and load. Raise `distill.seconds`, drop "
        "it, or lower `distill.iterations` / `distill.resolution` / `distill.batch_size`"
    )
    warnings.warn(msg, stacklevel=3)
    log.warning("WARNING: %s", msg)


def save_distilled(path: str | Path, data: torch.Tensor, config: DistillConfig) -> None:
    """Save distilled data with the config that made it, so an experiment pays for it once."""
    _check_shape(data, config, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": _FORMAT, "data": data.detach().cpu(), "config": config.to_dict()}, path)


def load_distilled(
    path: str | Path, input_shape: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, DistillConfig]:
    """Load what `save_distilled` wrote; with `input_shape` (C, H, W), also check it fits the
    model."""
    fix = "delete it and distil again (or save it with dfq.data.distill.save_distilled)"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DfqError(
            f"Distilled data file '{path}' does not exist.", "check the path, or distil first"
        ) from None
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise DfqError(
            f"'{path}' is not a readable distilled-data file ({type(e).__name__}).", fix
        ) from None
    if (
        not isinstance(blob, dict)
        or blob.get("format") != _FORMAT
        or not isinstance(blob.get("data"), torch.Tensor)
        or not isinstance(blob.get("config"), dict)
    ):
        raise DfqError(f"'{path}' is not a dfq distilled-data file.", fix)
    data, config = blob["data"], DistillConfig.from_dict(blob["config"])
    _check_shape(data, config, str(path))
    if input_shape is not None and tuple(data.shape[1:]) != tuple(input_shape):
        raise DfqError(
            f"Distilled data in '{path}' has images of shape {tuple(data.shape[1:])}, "
            f"but the model expects {tuple(input_shape)}.",
            "distil again at this input shape",
        )
    return data, config


def _check_shape(data: torch.Tensor, config: DistillConfig, where: str) -> None:
    expected = (
        config.batch_size * config.num_batches,
        len(config.mean),
        *(config.resolution or data.shape[2:]),
    )
    if data.dim() != 4 or tuple(data.shape) != expected or not data.is_floating_point():
        raise DfqError(
            f"Distilled data for '{where}' has shape {tuple(data.shape)} ({data.dtype}), "
            f"but its config describes float images of shape {expected}.",
            "save the data together with the config that produced it (DistillResult.config)",
        )
