"""Spatial windows of a local block: which input window computes which output pixels exactly.

A block of convolutions, pointwise activations, quantizers and adds computes each output pixel
from a small neighbourhood of its input, so learning on a window of the input costs a fraction
of a whole map and gives the same outputs away from the window's inner edges (where the
window's zero padding stands in for real pixels). Reconstruction learns on windows to make
each iteration cheaper; a block with anything global in it (pooling to 1x1, squeeze-excitation
gates, flatten) fails the check here and keeps whole maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx, nn

MIN_SIDE = 4  # output pixels a window learns on at least
MIN_SAVING = 2 / 3  # a window side must be at most this share of the map's to be worth it


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def receptive_margin(gm: fx.GraphModule, nodes: list[fx.Node], stride: tuple[int, int]):
    """An upper bound, in input pixels per spatial dim, on how far an output pixel's inputs
    reach from its centre: the sum of every conv's and pool's half-kernel, each at the
    block's whole stride (no path through the block has more)."""
    reach = [0, 0]
    for n in nodes:
        if n.op != "call_module":
            continue
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.Conv2d):
            k, d = _pair(m.kernel_size), _pair(m.dilation)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, d = _pair(m.kernel_size), _pair(getattr(m, "dilation", 1))
        else:
            continue
        for i in range(2):
            reach[i] += (k[i] - 1) * d[i] // 2 * stride[i]
    return tuple(reach)


@dataclass(frozen=True)
class Window:
    """An input window of `size` on maps of `full` for a block of `stride`; `margin` output
    pixels at each inner edge are spoiled by the window's padding and are not compared."""

    size: tuple[int, int]
    full: tuple[int, int]
    stride: tuple[int, int]
    margin: tuple[int, int]

    def at(self, start: tuple[int, int]) -> tuple[tuple[slice, ...], ...]:
        """For an input window starting at `start` (multiples of the stride): its input
        slices, the valid slices of the block's output on it, and the same pixels' slices in
        the block's output on whole maps."""
        inp, valid, full = [], [], []
        for i in range(2):
            s, m, h, big = self.stride[i], self.margin[i], self.size[i], self.full[i]
            i0 = start[i]
            lo = 0 if i0 == 0 else m
            hi = h // s if i0 + h == big else h // s - m
            inp.append(slice(i0, i0 + h))
            valid.append(slice(lo, hi))
            full.append(slice(i0 // s + lo, i0 // s + hi))
        return tuple(inp), tuple(valid), tuple(full)

    def starts(self) -> tuple[int, int]:
        """How many window positions each dim has (starts are multiples of the stride)."""
        return tuple((self.full[i] - self.size[i]) // self.stride[i] + 1 for i in range(2))

    def draw(self, gen: torch.Generator) -> tuple[tuple[slice, ...], ...]:
        """A window at a random position (see `at`)."""
        n = self.starts()
        pos = [int(torch.randint(0, n[i], (1,), generator=gen)) * self.stride[i] for i in range(2)]
        return self.at(tuple(pos))

    def describe(self) -> str:
        return f"{self.size[0]}x{self.size[1]} of {self.full[0]}x{self.full[1]}"


def plan_window(
    gm: fx.GraphModule,
    nodes: list[fx.Node],
    in_shape: torch.Size,
    out_shape: torch.Size,
    fraction: float,
) -> tuple[Window | None, str]:
    """The window whose valid output covers about `fraction` of each side of the block's
    output, or None and why not."""
    if len(in_shape) != 4 or len(out_shape) != 4:
        return None, "not a 2-d feature map"
    stride = []
    for i in (2, 3):
        h, ho = in_shape[i], out_shape[i]
        if ho == 0 or h % ho:
            return None, f"input {tuple(in_shape[2:])} is not a whole multiple of output"
        stride.append(h // ho)
    stride = tuple(stride)
    reach = receptive_margin(gm, nodes, stride)
    size, margin = [], []
    for i in range(2):
        s, ho = stride[i], out_shape[i + 2]
        m = math.ceil(reach[i] / s)
        side = max(MIN_SIDE, math.ceil(fraction * ho)) + 2 * m
        if side > MIN_SAVING * ho:
            side = ho  # whole in this dim
        size.append(side * s)
        margin.append(m)
    if size[0] == in_shape[2] and size[1] == in_shape[3]:
        return None, f"a {out_shape[2]}x{out_shape[3]} output is too small to window"
    return Window(tuple(size), tuple(in_shape[2:]), stride, tuple(margin)), ""


def window_is_exact(
    block: Callable[[torch.Tensor], torch.Tensor], window: Window, x: torch.Tensor
) -> bool:
    """Whether the block's output on windows of `x` (first, last and middle position) equals
    its output on whole maps away from the inner edges. A rounding flip at a quantizer is
    allowed at one output in a thousand; anything global changes nearly all of them."""
    with torch.no_grad():
        ref = block(x)
        if ref.dim() != 4:
            return False
        tol = 1e-4 * float(ref.abs().max()) + 1e-12
        n = window.starts()
        for k in (0, n[0] // 2, n[0] - 1):
            start = (k * window.stride[0], (k * (n[1] - 1) // max(1, n[0] - 1)) * window.stride[1])
            inp, valid, full = window.at(start)
            out = block(x[(..., *inp)])
            a = out[(..., *valid)]
            b = ref[(..., *full)]
            if a.shape != b.shape or float(((a - b).abs() > tol).float().mean()) > 1e-3:
                return False
    return True
