"""Activation ranges chosen by expected quantization error, for the quantizer's bit width.

A fixed mean +- 6 std is too wide at 8 bits for normal-like activations and far too wide below
8 bits: the rounding noise (step^2 / 12) grows with the range, the clipping error shrinks with
it, and the best range balances the two (ACIQ, Banner et al. 2019). Here the balance is struck
for what a per-tensor quantizer actually sees: the mixture of its channels, each the clipped
normal X = clamp(Y, a, b), Y ~ N(mu, sigma^2), that the data-free moments describe (BN after
folding, rectified by ReLU, clipped by ReLU6 or an equalized per-channel clip), or the samples
of a calibration batch.

The expected error of a range [l, h] splits into terms of l alone and of h alone,

    E(l, h) = clip_lo(l) + clip_hi(h) + step(l, h)^2 / 12 * (inside(h) - below(l)),

so every pair of a fine candidate grid is scored at the cost of two one-sided sweeps. Values
held exactly at 0 (ReLU's zeros) round without error: 0 is always on the grid.
"""

from __future__ import annotations

import math

import torch

from dfq.config import Grid
from dfq.statistics.moments import Moments

CANDIDATES = 1024  # candidate bounds per side: the range is found to 0.1 % of its extent
REACH = 12.0  # candidates reach mean +- REACH std (where no clip bounds the channel sooner)


SHAPES = ("laplace", "normal")


class ClippedChannels:
    """Channels X_c = clamp(Y_c, a_c, b_c), Y_c of mean mu_c and std sigma_c, normal or Laplace
    in shape (float64 tensors). Every term is a sum of the partial moments E[Y^k; Y <= t]."""

    def __init__(self, mu, sigma, a, b, shape: str = "laplace"):
        if shape not in SHAPES:
            raise ValueError(f"shape {shape!r}: use one of {SHAPES}")
        self.mu, self.sigma, self.a, self.b = (
            torch.as_tensor(t, dtype=torch.float64).reshape(-1) for t in (mu, sigma, a, b)
        )
        self.sigma = self.sigma.clamp_min(1e-12)
        self.shape = shape

    @classmethod
    def of(cls, m: Moments, shape: str = "laplace") -> "ClippedChannels":
        """The model of a tensor's moments: the distribution it was clipped from where it was
        clipped, else one of its own mean and variance, bounded by its range."""
        if m.clipped_from is not None:
            mu, sigma, a, b = m.clipped_from
            # a second clip composes the bounds; the range bounds what the clip left
            return cls(mu, sigma, torch.maximum(a, m.lo), torch.minimum(b, m.hi), shape)
        return cls(m.mean, m.var.clamp_min(0).sqrt(), m.lo, m.hi, shape)

    def _partial(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E[1; Y <= t], E[Y; Y <= t], E[Y^2; Y <= t] per channel (rows) and bound (columns)."""
        mu, sd = self.mu[:, None], self.sigma[:, None]
        finite = torch.isfinite(t)
        if self.shape == "normal":
            u = torch.where(finite, (t - mu) / sd, 0)
            cdf, pdf = torch.special.ndtr(u), torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
            m0, m1 = cdf, mu * cdf - sd * pdf
            m2 = mu * mu * cdf - 2 * mu * sd * pdf + sd * sd * (cdf - u * pdf)
        else:  # Laplace of scale beta = sigma / sqrt(2); from the upper tail above the mean
            beta = sd / math.sqrt(2)
            u = torch.where(finite, (t - mu) / beta, 0)
            e = 0.5 * torch.exp(-u.abs())
            below = u <= 0
            # below the mean: E[V^k; V <= u] of the standard Laplace; above: total - upper tail
            j1 = torch.where(below, e * (u - 1), -e * (u + 1))
            j2 = torch.where(below, e * (u * u - 2 * u + 2), 2 - e * (u * u + 2 * u + 2))
            m0 = torch.where(below, e, 1 - e)
            m1 = mu * m0 + beta * j1
            m2 = mu * mu * m0 + 2 * mu * beta * j1 + beta * beta * j2
        top = t > 0
        total = (torch.ones_like(mu), mu, mu * mu + sd * sd)
        return tuple(
            torch.where(finite, m, torch.where(top, full, 0))
            for m, full in zip((m0, m1, m2), total)
        )

    def _clamped(self, lo: torch.Tensor, hi: torch.Tensor):
        """E[Z], E[Z^2] of Z = clamp(Y, lo, hi) (lo <= hi; infinite bounds allowed)."""
        p_lo, p_hi = self._partial(lo), self._partial(hi)
        lo_f, hi_f = torch.where(torch.isfinite(lo), lo, 0), torch.where(torch.isfinite(hi), hi, 0)
        m1 = lo_f * p_lo[0] + p_hi[1] - p_lo[1] + hi_f * (1 - p_hi[0])
        m2 = lo_f**2 * p_lo[0] + p_hi[2] - p_lo[2] + hi_f**2 * (1 - p_hi[0])
        return m1, m2

    def side_terms(self, lows: torch.Tensor, highs: torch.Tensor):
        """Channel means of the one-sided terms for candidate bounds: (clip_lo(l),
        below(l)) over `lows` and (clip_hi(h), inside(h)) over `highs`."""
        a, b = self.a[:, None], self.b[:, None]
        h = highs[None, :].expand(len(self.mu), -1)
        l = lows[None, :].expand(len(self.mu), -1)
        # above h: clamp(Y, max(h, a), b) - h, nothing when h >= b
        z1, z2 = self._clamped(torch.maximum(h, a), b.expand_as(h))
        clip_hi = torch.where(h < b, z2 - 2 * h * z1 + h * h, 0).clamp_min(0)
        z1, z2 = self._clamped(a.expand_as(l), torch.minimum(l, b))
        clip_lo = torch.where(l > a, l * l - 2 * l * z1 + z2, 0).clamp_min(0)
        # rounding: the continuous part inside (l, h), plus the mass at a bound a or b that lies
        # inside (it rounds like any value unless it is 0)
        cdf_a, cdf_b = self._partial(a)[0], self._partial(b)[0]
        mass_b = torch.where((b < h) & (b != 0), 1 - cdf_b, 0)
        mass_a = torch.where((a > l) & (a != 0), cdf_a, 0)
        inside = self._partial(torch.minimum(h, b))[0] + mass_b
        below = self._partial(torch.maximum(l, a))[0] - mass_a
        return (clip_lo.mean(0), below.mean(0)), (clip_hi.mean(0), inside.mean(0))

    def extent(self) -> tuple[float, float]:
        lo = torch.maximum(self.a, self.mu - REACH * self.sigma).min()
        hi = torch.minimum(self.b, self.mu + REACH * self.sigma).max()
        return float(lo), float(hi)

    def shift(self, scale: float, zero_point: int, grid: Grid) -> torch.Tensor:
        """E[Q(X_c)] - E[X_c] per channel for the grid (scale, zero point), exactly: with the
        cell edges m_j (midpoints between levels), E[Q(X)] = q_lo + scale * sum_j P(X > m_j).
        Grids above 10 bits take the clipping shift alone (rounding is then unbiased to
        well below the clipping's shift)."""
        lo, hi = (grid.qmin - zero_point) * scale, (grid.qmax - zero_point) * scale
        a, b = self.a[:, None], self.b[:, None]
        mean = self._clamped(a, b)[0][:, 0]
        if grid.qmax - grid.qmin > 1024:
            return self._clamped(torch.clamp(a, lo, hi), torch.clamp(b, lo, hi))[0][:, 0] - mean
        edges = lo + scale * (0.5 + torch.arange(grid.qmax - grid.qmin, dtype=torch.float64))
        t = edges[None, :].expand(len(self.mu), -1)
        cdf = torch.where(t < a, 0, torch.where(t >= b, 1, self._partial(t)[0]))
        return lo + scale * (1 - cdf).sum(1) - mean


class Samples:
    """Observed values (one flat tensor), scored with the same terms as ClippedChannels."""

    def __init__(self, x: torch.Tensor):
        self.x = torch.sort(x.detach().flatten().double()).values
        n = len(self.x)
        zero = (self.x == 0).double()
        self.s1 = torch.cat([torch.zeros(1, dtype=torch.float64), self.x.cumsum(0)]) / n
        self.s2 = torch.cat([torch.zeros(1, dtype=torch.float64), (self.x**2).cumsum(0)]) / n
        self.nonzero = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - zero).cumsum(0)]) / n

    def side_terms(self, lows: torch.Tensor, highs: torch.Tensor):
        x = self.x
        i = torch.searchsorted(x, highs, right=True)  # x[:i] <= h
        j = torch.searchsorted(x, lows, right=False)  # x[:j] < l
        # sum over x > h of (x - h)^2, and over x < l of (l - x)^2, from prefix sums
        s1_hi, s2_hi = self.s1[-1] - self.s1[i], self.s2[-1] - self.s2[i]
        frac_hi = 1 - i.double() / len(x)
        clip_hi = s2_hi - 2 * highs * s1_hi + highs**2 * frac_hi
        frac_lo = j.double() / len(x)
        clip_lo = lows**2 * frac_lo - 2 * lows * self.s1[j] + self.s2[j]
        # values on a bound sit on the grid (a clip's mass at the top level rounds exactly)
        inside = self.nonzero[torch.searchsorted(x, highs, right=False)]  # x < h
        below = self.nonzero[torch.searchsorted(x, lows, right=True)]  # x <= l
        return (clip_lo, below), (clip_hi, inside)

    def extent(self) -> tuple[float, float]:
        return float(self.x[0]), float(self.x[-1])


def step(lows: torch.Tensor, highs: torch.Tensor, grid: Grid) -> torch.Tensor:
    if grid.symmetric:
        return torch.maximum(-lows, highs) / grid.qmax
    return (highs - lows) / (grid.qmax - grid.qmin)


def _error(lo_terms, hi_terms, s: torch.Tensor) -> torch.Tensor:
    """Clipping on both sides plus step^2 / 12 on what lies inside (terms broadcast)."""
    (clip_lo, below), (clip_hi, inside) = lo_terms, hi_terms
    return clip_lo + clip_hi + s**2 / 12 * (inside - below).clamp_min(0)


def expected_error(dist, lo: float, hi: float, grid: Grid) -> float:
    """E[(Q(X) - X)^2] of the range [lo, hi] on `grid`, under the uniform-rounding model."""
    lows = torch.tensor([lo], dtype=torch.float64)
    highs = torch.tensor([hi], dtype=torch.float64)
    return float(_error(*dist.side_terms(lows, highs), step(lows, highs, grid)))


def best_range(dist, grid: Grid, candidates: int = CANDIDATES) -> tuple[float, float]:
    """The range [lo, hi] (containing 0) with the least expected error for `dist` (a
    ClippedChannels or Samples) on `grid`; a symmetric grid gets lo = -hi."""
    lo_end, hi_end = dist.extent()
    lo_end, hi_end = min(lo_end, 0.0), max(hi_end, 0.0)
    if lo_end == hi_end:
        return 0.0, 0.0
    t = torch.linspace(1 / candidates, 1, candidates, dtype=torch.float64)
    if grid.symmetric:
        highs = max(-lo_end, hi_end) * t
        err = _error(*dist.side_terms(-highs, highs), step(-highs, highs, grid))
        h = float(highs[int(torch.argmin(err))])
        return -h, h
    lows = lo_end * t if lo_end < 0 else torch.zeros(1, dtype=torch.float64)
    highs = hi_end * t if hi_end > 0 else torch.zeros(1, dtype=torch.float64)
    (clip_lo, below), (clip_hi, inside) = dist.side_terms(lows, highs)
    lo_terms = (clip_lo[:, None], below[:, None])  # rows: candidate lows; columns: highs
    err = _error(lo_terms, (clip_hi, inside), step(lows[:, None], highs[None, :], grid))
    k = int(torch.argmin(err))
    return float(lows[k // len(highs)]), float(highs[k % len(highs)])
