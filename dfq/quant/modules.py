"""Fake-quant modules: what the simulated integer model is made of.

Quantized conv/linear layers stay nn.Conv2d / nn.Linear subclasses whose weight and bias
hold their *dequantized* integer values, so the forward is the float op on exactly the
values an int8 runtime uses, and exporters recover the integers with `int_weight()`.
`ActQuant` rounds an activation onto its grid (a QuantizeLinear/DequantizeLinear pair).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dfq.config import Grid
from dfq.quant.primitives import ROUNDING, dequantize, fake_quantize_ste, fma_float32, quantize

QUANTIZE, OBSERVE, FLOAT = "quantize", "observe", "float"


class ActQuant(nn.Module):
    """Per-tensor activation fake quantization, in one of three modes: `quantize` (round onto
    the grid), `observe` (record min/max, pass the value through) or `float` (no range could be
    set: the tensor stays float, and reports and exporters say so)."""

    def __init__(self, grid: Grid, rounding: str = "half_even", reciprocal: bool = False):
        super().__init__()
        self.grid = grid
        self.rounding = rounding
        # ncnn multiplies by the float32 reciprocal (its "scale" is 1/ours) instead of dividing
        self.reciprocal = reciprocal
        # OpenVINO's FakeQuantize: round(clamp(x) * levels / (hi - lo) - lo * that), in float32
        self.fake_quantize_op = False
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self.register_buffer("observed_min", torch.tensor(float("inf")))
        self.register_buffer("observed_max", torch.tensor(float("-inf")))
        self.mode = QUANTIZE
        # set by dfq.transforms.reconstruct while it learns `scale`: gradients then reach the
        # scale (LSQ)
        self.learn_scale = False

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in (QUANTIZE, OBSERVE, FLOAT):
            raise ValueError(f"ActQuant mode {mode!r}: use quantize, observe or float")
        self._mode = mode

    @property
    def quantizing(self) -> bool:
        return self._mode == QUANTIZE

    def set_range(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mode != QUANTIZE:
            if self._mode == OBSERVE:
                self.observed_min.copy_(torch.minimum(self.observed_min, x.detach().min()))
                self.observed_max.copy_(torch.maximum(self.observed_max, x.detach().max()))
            return x
        if self.learn_scale:
            return fake_quantize_ste(x, self.scale, self.zero_point, self.grid)
        if self.fake_quantize_op:
            return self._fake_quantize_op(x)
        grad = x.requires_grad and torch.is_grad_enabled()
        torch_kernel = not self.reciprocal and self.rounding == "half_even"
        if torch_kernel and x.dtype == torch.float32 and grad:  # straight-through gradient
            return torch.fake_quantize_per_tensor_affine(
                x, self.scale, self.zero_point.int(), self.grid.qmin, self.grid.qmax
            )
        if self.reciprocal or (torch_kernel and x.dtype == torch.float32):
            # round(x * (1/s)) clamped to [qmin - z, qmax - z], times s: ncnn's numbers, and
            # torch's kernel's, in place without gradients (2x faster than that kernel on CPU)
            r = ROUNDING[self.rounding](x * self.inv_scale().to(x.dtype))
            lo, hi = self.grid.qmin - self.zero_point, self.grid.qmax - self.zero_point
            return r.clamp(lo, hi) * self.scale if grad else r.clamp_(lo, hi).mul_(self.scale)
        q = ROUNDING[self.rounding](x / self.scale) + self.zero_point
        return (q.clamp(self.grid.qmin, self.grid.qmax) - self.zero_point) * self.scale

    def _fake_quantize_op(self, x: torch.Tensor) -> torch.Tensor:
        """OpenVINO's arithmetic: QuantizeLinear becomes a FakeQuantize over the float32 bounds
        [lo, hi] = [(qmin - z) s, (qmax - z) s] that rounds `fma(x, k, -lo k)` with
        k = levels / (hi - lo) computed in float64 and both constants then rounded to float32.
        `1 / s` and k differ in the last bit, and so does k computed from a float32 hi - lo: each
        flips rounding ties (measured: 38 of 4M values of a conv's output at 114.5 steps)."""
        s, z = self.scale.float(), self.zero_point.float()
        lo, hi = (self.grid.qmin - z) * s, (self.grid.qmax - z) * s
        k = (self.grid.qmax - self.grid.qmin) / (hi.double() - lo.double())
        in_scale, shift = k.float(), (-lo.double() * k).float()
        xc = x.float().clamp(lo, hi)
        q = ROUNDING[self.rounding](fma_float32(xc, in_scale, shift))
        return ((q + (self.grid.qmin - z)) * s).to(x.dtype)

    def inv_scale(self) -> torch.Tensor:
        """1/scale in float32: the number ncnn multiplies by (written as-is into its .bin)."""
        return 1.0 / self.scale.float()

    def extra_repr(self) -> str:
        return (
            f"{self._mode}, bits={self.grid.bits}, symmetric={self.grid.symmetric}, "
            f"scale={float(self.scale):.4g}, zp={int(self.zero_point)}"
        )


class QuantizedLayer:
    """Mixin: integer weight/bias parameters beside the dequantized float ones."""

    weight_grid: Grid
    weight_axis: int | None  # None = per-tensor, 0 = per output channel
    bias_grid: Grid | None

    def init_quant(
        self,
        weight_q: torch.Tensor,
        scale: torch.Tensor,
        zp: torch.Tensor,
        grid: Grid,
        axis: int | None,
    ) -> None:
        self.weight_grid, self.weight_axis, self.bias_grid = grid, axis, None
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zp)
        self.register_buffer("bias_scale", torch.ones(()))
        with torch.no_grad():
            self.weight.copy_(dequantize(weight_q, scale, zp, axis, self.weight.dtype))

    def int_weight(self) -> torch.Tensor:
        return quantize(
            self.weight.detach(),
            self.weight_scale,
            self.weight_zero_point,
            self.weight_grid,
            self.weight_axis,
        )

    def set_bias_quant(self, scale: torch.Tensor, grid: Grid) -> None:
        """Put the bias on `grid` at `scale` (per-tensor or per output channel)."""
        self.bias_grid = grid
        self.bias_scale = scale.to(torch.float64)
        zero = torch.zeros_like(self.bias_scale, dtype=torch.int64)
        axis = 0 if scale.dim() else None
        with torch.no_grad():
            q = quantize(self.bias.detach(), self.bias_scale, zero, grid, axis)
            self.bias.copy_(dequantize(q, self.bias_scale, zero, axis, self.bias.dtype))

    def int_bias(self) -> torch.Tensor:
        zero = torch.zeros_like(self.bias_scale, dtype=torch.int64)
        axis = 0 if self.bias_scale.dim() else None
        return quantize(self.bias.detach(), self.bias_scale, zero, self.bias_grid, axis)


class Requant(NamedTuple):
    """What onnxruntime's QLinearConv needs to requantize its accumulator."""

    in_scale: torch.Tensor
    out_scale: torch.Tensor
    out_zero_point: int
    qmin: int
    qmax: int


class AddGrids(NamedTuple):
    """What a runtime's integer add needs: each operand's grid and the output's (dfq's uint8
    grids: scale, zero point; the output's bounds)."""

    a_scale: float
    a_zero_point: int
    b_scale: float
    b_zero_point: int
    out_scale: float
    out_zero_point: int
    qmin: int
    qmax: int


class Dequant(NamedTuple):
    """How ncnn turns an int8 layer's int32 sums back into float32 (dfq.quant.integer_exact):
    `acc * multiplier[c] + bias[c]`, rounded once (`fused`, an FMA) or after each step."""

    in_scale: torch.Tensor
    multiplier: torch.Tensor  # float32, per output channel
    fused: bool


FLOAT32_EXACT = 2**24  # every integer of magnitude up to this is a float32


def exact_integer_op(op, xi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
    """`op(xi, wi)` (a convolution or matrix product) of integer-valued tensors, exactly: in
    float32 when every value fits (|v| < 2^24), else in float64.

    On the CPU it runs in float32 where that is exact: if every |partial sum| stays below 2^24
    (bounded by max|x| times the largest per-output-channel sum of |w|), each float32 addition is
    exact in any order. Where one pass would not fit, the input is split as x = hi * 2^k + lo
    (0 <= lo < 2^k) with both passes inside the bound; float64 remains for what even that cannot
    hold, and on other devices (whose convolution algorithms may transform the operands).
    About 3x cheaper than float64 on MobileNetV2 (benchmarks/throughput.py)."""
    if xi.device.type != "cpu":
        return op(xi.double(), wi.double())
    wsum = float(wi.abs().flatten(1).sum(1).max()) if wi.numel() else 0.0
    if xi.numel():
        lo_x, hi_x = torch.aminmax(xi)
        xmax = max(-float(lo_x), float(hi_x))
    else:
        xmax = 0.0
    with torch.backends.nnpack.flags(enabled=False):  # NNPACK's Winograd/FFT would not be exact
        if xmax * wsum < FLOAT32_EXACT:
            return op(xi.float(), wi.float())
        k = int(math.floor(math.log2(FLOAT32_EXACT / wsum))) if wsum >= 1 else 24
        step = 2.0**k
        if k >= 1 and (math.floor(xmax / step) + 1) * wsum < FLOAT32_EXACT:
            hi = torch.floor(xi / step)
            lo = xi - hi * step
            wf = wi.float()
            return op(hi.float(), wf).double() * step + op(lo.float(), wf).double()
    return op(xi.double(), wi.double())


def _integer_forward(layer, x: torch.Tensor, op) -> torch.Tensor | None:
    """The runtime's arithmetic when `layer.requant` or `layer.dequant` is set, else None:
    the exact int32 accumulator, then the runtime's float32 steps."""
    r, d = layer.requant, layer.dequant
    if r is None and d is None:
        return None
    xi = torch.round(
        x.float() / (r or d).in_scale.float()
    )  # the input's integers (q - zp), exact in float32
    acc = exact_integer_op(op, xi, layer.int_weight().float())
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    if r is not None:
        if layer.bias is not None:  # int32 sum: exact in float64
            acc = acc.double() + layer.int_bias().double().reshape(shape)
        m = (
            r.in_scale.float() * layer.weight_scale.float()
        ) / r.out_scale.float()  # float32, as the runtime
        y = acc.float() * m.to(acc.device).reshape(shape)
        zp = float(r.out_zero_point)
        return (torch.round(y.clamp(r.qmin - zp, r.qmax - zp)) * r.out_scale.float()).to(x.dtype)
    m = d.multiplier.to(acc.device).reshape(shape)
    bias = layer.bias.detach().float().reshape(shape) if layer.bias is not None else torch.zeros(())
    if d.fused:  # acc * m exact in float64 (< 53 bits), one rounding to float32 after the add
        y = fma_float32(acc, m, bias)
    else:
        y = acc.float() * m + bias
    return y.to(x.dtype)


class QuantizedConv2d(QuantizedLayer, nn.Conv2d):
    requant: Requant | None = None  # set: compute like onnxruntime's QLinearConv, exactly
    dequant: Dequant | None = None  # set: compute like ncnn's int8 convolution, exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _integer_forward(
            self,
            x,
            lambda xi, w: F.conv2d(
                xi, w, None, self.stride, self.padding, self.dilation, self.groups
            ),
        )
        return super().forward(x) if y is None else y


class QuantizedLinear(QuantizedLayer, nn.Linear):
    requant = None
    dequant: Dequant | None = None  # set: compute like ncnn's int8 InnerProduct, exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _integer_forward(self, x, F.linear)
        return super().forward(x) if y is None else y


def layer_like(m: nn.Module, linear=nn.Linear, conv=nn.Conv2d) -> nn.Module:
    """A new (freshly initialised) `linear` or `conv` layer with m's configuration."""
    if isinstance(m, nn.Linear):
        return linear(m.in_features, m.out_features, bias=m.bias is not None)
    return conv(
        m.in_channels,
        m.out_channels,
        m.kernel_size,
        m.stride,
        m.padding,
        m.dilation,
        m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    )


def quantized_copy(m: nn.Module) -> nn.Module:
    """A Quantized* layer with m's configuration and (copied) float parameters."""
    q = layer_like(m, QuantizedLinear, QuantizedConv2d)
    q = q.to(dtype=m.weight.dtype, device=m.weight.device)
    q.load_state_dict(m.state_dict())
    q.requires_grad_(False)
    return q


def _mlas_add(xi: torch.Tensor, yi: torch.Tensor, g) -> torch.Tensor:
    """onnxruntime's QLinearAdd on x86 (MLAS's AVX2 kernel): on the raw uint8 values, in float32
    FMAs, `fma(a, s_a/s_c, fma(b, s_b/s_c, z_c - (s_a/s_c z_a + s_b/s_c z_b)))`, rounded half to
    even and saturated."""
    f32 = functools.partial(torch.tensor, dtype=torch.float32, device=xi.device)
    ra, rb = f32(g.a_scale) / f32(g.out_scale), f32(g.b_scale) / f32(g.out_scale)
    fixed = f32(g.out_zero_point) - fma_float32(ra, f32(g.a_zero_point), rb * f32(g.b_zero_point))
    t = fma_float32((yi + g.b_zero_point).float(), rb, fixed)
    t = fma_float32((xi + g.a_zero_point).float(), ra, t)
    return torch.round(t).clamp(g.qmin, g.qmax).long() - g.out_zero_point


def _xnnpack_add(xi: torch.Tensor, yi: torch.Tensor, g) -> torch.Tensor:
    """XNNPACK's qs8 add (its xnn_init_qs8_add_minmax params): each ratio s_in / s_out a float32,
    made a fixed-point multiplier with 20 fractional bits below the larger ratio's leading bit;
    the integer products plus half a unit, shifted right (floor)."""
    out = torch.tensor(g.out_scale, dtype=torch.float32)
    ratios = torch.stack(
        [torch.tensor(s, dtype=torch.float32) / out for s in (g.a_scale, g.b_scale)]
    )
    shift = 20 - (int(torch.frexp(ratios.abs().max()).exponent) - 1)
    am, bm = (int(v) for v in torch.round(torch.ldexp(ratios, torch.tensor(shift))))
    acc = xi * am + yi * bm + (1 << (shift - 1))
    zp = g.out_zero_point
    return torch.clamp(acc >> shift, g.qmin - zp, g.qmax - zp)


class IntegerAdd(nn.Module):
    """x + y; with `requant` set (an AddGrids), computed on the operands'
    integers as the runtime's quantized add: `arithmetic` "mlas" (onnxruntime's QLinearAdd) or
    "xnnpack" (its qs8 add). A float add then a quantizer rounds their near-ties the other way:
    38 of 928k values of MobileNetV2's features.5 add on XNNPACK (65.49999 against its 65.5),
    and on onnxruntime 1-3 of the 65536 int8 pairs of one add in three, which deep nets amplify
    into images off."""

    requant = None  # an AddGrids: set by the onnxruntime / XNNPACK profiles

    def __init__(self, arithmetic: str = "mlas"):
        super().__init__()
        self.arithmetic = arithmetic

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.requant
        if g is None:
            return x + y
        xi = torch.round(x.double() / g.a_scale).long()  # the operands' integers (q - z)
        yi = torch.round(y.double() / g.b_scale).long()
        q = (_xnnpack_add if self.arithmetic == "xnnpack" else _mlas_add)(xi, yi, g)
        return (q.float() * torch.tensor(g.out_scale, dtype=torch.float32, device=q.device)).to(
            x.dtype
        )
