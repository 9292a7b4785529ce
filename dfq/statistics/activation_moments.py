"""Mean, variance and range of an elementwise activation of a normal variable (SiLU, GELU, ...).

For X ~ N(mu, sigma^2) per channel, E[f(X)] and Var[f(X)] are sums over pieces of the real line:
- polynomial pieces (leaky ReLU, hard sigmoid, hard swish, and the asymptotes of the smooth ones)
  in closed form, from the partial moments E[Z^k; a < Z < b] of the standard normal;
- smooth pieces (SiLU, GELU, Mish, sigmoid, tanh on |x| < 40; ELU's exponential) by Gauss-Legendre
  quadrature over the piece's window, cut at 10 sigma.
Why not one Gauss-Hermite rule over the whole line: its nodes lie ~0.4 sigma apart, so once sigma
>> 1 they step over the nonlinearity near 0 (64 nodes miss SiLU's mean by 0.5 % of a std at
sigma = 100); here the window shrinks with the piece instead. The variance is taken about the
mean, E[(f - m)^2] rather than E[f^2] - m^2, and everything runs in float64, so that a channel
with a tiny sigma keeps its digits; sigma = 0 gives f(mu) and 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

INF = math.inf
_L = 40.0  # beyond |x| = 40 each smooth activation equals its asymptote to ~1e-16
_Z = 10.0  # quadrature windows stop at 10 sigma (the normal's mass beyond: 1e-23)
_NODES, _WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(128))

Poly = tuple[float, ...]  # coefficients c_0, c_1, ... of sum c_j x^j
Piece = tuple[float, float, Poly | Callable[[torch.Tensor], torch.Tensor]]  # [a, b) and f there


def _smooth(f, below: Poly, above: Poly) -> tuple[Piece, ...]:
    return (-INF, -_L, below), (-_L, _L, f), (_L, INF, above)


_ZERO, _IDENTITY = (0.0,), (0.0, 1.0)
# kind -> (pieces, where f has its interior minimum or None if monotone); `p` is the op's
# parameter (negative_slope, alpha, GELU's approximate). Minima: f'(x) = 0, Newton in float64.
SHAPES: dict[str, Callable[[object], tuple[tuple[Piece, ...], float | None]]] = {
    "silu": lambda p: (_smooth(F.silu, _ZERO, _IDENTITY), -1.278464542761074),
    "gelu": lambda p: (
        _smooth(lambda x: F.gelu(x, approximate=p or "none"), _ZERO, _IDENTITY),
        -0.7524614220710163 if p == "tanh" else -0.7517915246935644,
    ),
    "mish": lambda p: (_smooth(F.mish, _ZERO, _IDENTITY), -1.1924312145154954),
    "sigmoid": lambda p: (_smooth(torch.sigmoid, _ZERO, (1.0,)), None),
    "tanh": lambda p: (_smooth(torch.tanh, (-1.0,), (1.0,)), None),
    "elu": lambda a: (
        ((-INF, -_L, (-a,)), (-_L, 0.0, lambda x: a * torch.expm1(x)), (0.0, INF, _IDENTITY)),
        0.0,
    ),
    "leaky_relu": lambda k: (((-INF, 0.0, (0.0, k)), (0.0, INF, _IDENTITY)), 0.0),
    "hardsigmoid": lambda p: (
        ((-INF, -3.0, _ZERO), (-3.0, 3.0, (0.5, 1 / 6)), (3.0, INF, (1.0,))),
        None,
    ),
    "hardswish": lambda p: (
        ((-INF, -3.0, _ZERO), (-3.0, 3.0, (0.0, 0.5, 1 / 6)), (3.0, INF, _IDENTITY)),
        -1.5,
    ),
}


def normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _partial_moments(alpha: torch.Tensor, beta: torch.Tensor, k_max: int) -> list[torch.Tensor]:
    """I_k = E[Z^k; alpha < Z < beta], Z ~ N(0, 1), k = 0..k_max, by
    I_k = (k - 1) I_{k-2} + alpha^{k-1} phi(alpha) - beta^{k-1} phi(beta)."""

    def edge(t, k):  # t^(k-1) phi(t), 0 far out (and at +-inf, where it would be inf * 0)
        return torch.where(t.abs() < 40, t.pow(k - 1) * normal_pdf(t), 0.0)

    ndtr = torch.special.ndtr
    mass = torch.where(
        alpha > 0, ndtr(-alpha) - ndtr(-beta), ndtr(beta) - ndtr(alpha)
    )  # tails without cancelling
    moments = [mass, edge(alpha, 1) - edge(beta, 1)]
    for k in range(2, k_max + 1):
        moments.append((k - 1) * moments[k - 2] + edge(alpha, k) - edge(beta, k))
    return moments


def _polymul(a: list, b: list) -> list:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] = out[i + j] + x * y
    return out


def _in_z(c: Poly, mu: torch.Tensor, s: torch.Tensor, shift: torch.Tensor) -> list:
    """Coefficients in z of c(mu + s z) - shift (Horner over the linear polynomial mu + s z)."""
    out: list = [c[-1]]
    for cj in reversed(c[:-1]):
        out = _polymul(out, [mu, s])
        out[0] = out[0] + cj
    out[0] = out[0] - shift
    return out


def _expect(
    pieces, mu: torch.Tensor, s: torch.Tensor, power: int, shift: torch.Tensor
) -> torch.Tensor:
    """E[(f(X) - shift)^power], power 1 or 2, summed over the pieces of f."""
    total = torch.zeros_like(mu)
    for a, b, f in pieces:
        alpha, beta = (a - mu) / s, (b - mu) / s
        if callable(f):
            lo, hi = alpha.clamp(-_Z, _Z), beta.clamp(-_Z, _Z)
            half = ((hi - lo) / 2).clamp_min(0)
            z = (lo + half)[:, None] + half[:, None] * _NODES
            y = (f(mu[:, None] + s[:, None] * z) - shift[:, None]) ** power
            total = total + (half[:, None] * _WEIGHTS * normal_pdf(z) * y).sum(1)
        else:
            d = _in_z(f, mu, s, shift)
            if power == 2:
                d = _polymul(d, d)
            moments = _partial_moments(alpha, beta, len(d) - 1)
            total = total + sum(dk * ik for dk, ik in zip(d, moments))
    return total


def activation_moments(
    kind: str, param, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """E[f(X)] and Var[f(X)] per channel for X ~ N(mean, var), in mean's dtype."""
    pieces, _ = SHAPES[kind](param)
    mu = mean.detach().double()
    sd = var.detach().double().clamp_min(0).sqrt()
    s = sd.clamp_min(torch.finfo(torch.float64).tiny)
    m = _expect(pieces, mu, s, 1, torch.zeros_like(mu))
    v = _expect(pieces, mu, s, 2, m).clamp_min(0)
    degenerate = sd == 0  # a constant channel (a BN gamma of 0): exactly f(mu)
    m, v = torch.where(degenerate, evaluate(kind, param, mu), m), torch.where(degenerate, 0.0, v)
    return m.to(mean.dtype), v.to(mean.dtype)


def evaluate(kind: str, param, x: torch.Tensor) -> torch.Tensor:
    """f(x), piece by piece (finite at x = +-inf where f is)."""
    pieces, _ = SHAPES[kind](param)
    out = torch.zeros_like(x)
    for a, b, f in pieces:
        if callable(f):
            y = f(x)
        else:  # only the nonzero terms: 0 * inf would be NaN
            y = sum((cj * x**j for j, cj in enumerate(f) if cj), torch.zeros_like(x))
        out = torch.where((x >= a) & (x < b) | ((b == INF) & (x == INF)), y, out)
    return out


def activation_range(
    kind: str, param, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[min f, max f] over [lo, hi] per channel: the ends, and the interior minimum where f
    has one."""
    _, x_min = SHAPES[kind](param)
    points = [lo, hi]
    if x_min is not None:
        points.append(torch.minimum(torch.maximum(torch.full_like(lo, x_min), lo), hi))
    values = torch.stack([evaluate(kind, param, p) for p in points])
    return values.amin(0), values.amax(0)
