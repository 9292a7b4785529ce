"""Uniform affine quantization: q = clamp(round(x / scale) + zp, qmin, qmax).

Zero points are integers, so 0.0 is always exactly representable (zero padding, ReLU
zeros). Symmetric grids are narrow ([-127, 127] at 8 bits), as int8 runtimes use them.
"""

from __future__ import annotations

import torch

from dfq.config import Grid


def round_half_even(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(), which ncnn uses."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


ROUNDING = {"half_even": round_half_even, "half_away": round_half_away}


def fma_float32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once to float32, as a CPU's FMA: the product of two float32 (or of an
    integer below 2^29 and a float32) is exact in float64, and so is its sum with c at the
    magnitudes the runtimes' arithmetic meets."""
    return (a.double() * b.double() + c.double()).float()


def qparams(lo: torch.Tensor, hi: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [lo, hi] (widened to contain 0), per element.

    A zero-width range gets scale 1 (its only value, 0, is exact) instead of a NaN, as does
    one so narrow that its float32 scale would be denormal or 0 (1/scale not finite).
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float64), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float64), torch.zeros(()))
    if grid.symmetric:
        scale = torch.maximum(-lo, hi) / grid.qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (grid.qmax - grid.qmin)
        zp = None
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, torch.ones_like(scale))
    if zp is None:
        zp = torch.clamp(torch.round(grid.qmin - lo / scale), grid.qmin, grid.qmax)
    return scale.float(), zp.to(torch.int64)


def _shape(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    grid: Grid,
    axis: int | None = None,
    rounding: str = "half_even",
) -> torch.Tensor:
    """Integer values (as int64) of x on the grid; per-channel along `axis` when given."""
    s, z = _shape(scale, x, axis), _shape(zp, x, axis)
    q = ROUNDING[rounding](x.double() / s.double()) + z
    return q.clamp(grid.qmin, grid.qmax).to(torch.int64)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    axis: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    s, z = _shape(scale, q, axis), _shape(zp, q, axis)
    return ((q - z).to(torch.float64) * s.double()).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    grid: Grid,
    axis: int | None = None,
    rounding: str = "half_even",
) -> torch.Tensor:
    return dequantize(quantize(x, scale, zp, grid, axis, rounding), scale, zp, axis, x.dtype)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with the gradient passed straight through (identity)."""
    return (torch.round(x) - x).detach() + x


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """Per-tensor fake quantization differentiable in x and in `scale` (LSQ, Esser et al. 2020):
    rounding passes the gradient straight through, clamping stops it; values that round onto
    qmin/qmax are inside the grid. float32 runs PyTorch's fused kernel (one pass each way)."""
    if x.dtype == torch.float32:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1).float(), zp.reshape(1).float(), grid.qmin, grid.qmax, 1.0
        )
    u = x / scale
    r = torch.round(u).detach()
    level = r + zp
    inside = (level >= grid.qmin) & (level <= grid.qmax)
    clamped = torch.clamp(level, grid.qmin, grid.qmax) - zp
    return torch.where(inside, (r - u).detach() + u, clamped) * scale


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of y against x, in dB."""
    x, y = x.detach().double(), y.detach().double()
    noise = (x - y).pow(2).sum()
    signal = x.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))
