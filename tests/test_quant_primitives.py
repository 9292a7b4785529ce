"""Quantizer properties (hypothesis) and the torch fake-quant oracle."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dfq.quant.primitives import (
    Grid,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    qparams,
    quantize,
    round_half_away,
)

grids = st.builds(Grid, bits=st.integers(2, 16), symmetric=st.booleans())
bounds = st.tuples(st.floats(-100, 100), st.floats(-100, 100)).map(sorted)


@settings(max_examples=200, deadline=None)
@given(grids, bounds, st.integers(0, 2**31 - 1))
def test_round_trip_error_at_most_half_a_step(grid, lohi, seed):
    lo, hi = lohi
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), grid)
    assert zp.dtype == torch.int64 and grid.qmin <= int(zp) <= grid.qmax
    x = torch.empty(200, dtype=torch.float64).uniform_(
        lo, hi, generator=torch.Generator().manual_seed(seed)
    )
    err = (fake_quantize(x, scale, zp, grid) - x).abs().max()
    assert err <= float(scale) / 2 * (1 + 1e-6) + 1e-12


@settings(max_examples=100, deadline=None)
@given(grids, bounds)
def test_zero_is_exact_and_quantization_idempotent(grid, lohi):
    scale, zp = qparams(torch.tensor(lohi[0]), torch.tensor(lohi[1]), grid)
    assert float(fake_quantize(torch.zeros(1), scale, zp, grid)) == 0.0
    x = torch.linspace(lohi[0], lohi[1], 50)
    once = fake_quantize(x, scale, zp, grid)
    assert torch.equal(fake_quantize(once, scale, zp, grid), once)


def test_zero_range_channel_gives_finite_scale():
    hi = torch.tensor([0.0, 1.0, 0.0, 1e-43], dtype=torch.float64)  # 1e-43: a denormal scale
    for grid in (Grid(8, True), Grid(8, False)):
        scale, zp = qparams(torch.zeros(4), hi, grid)
        assert torch.isfinite(1 / scale).all() and (scale > 0).all()
        assert scale[0] == scale[3] == 1.0


def test_per_channel_matches_torch_oracle():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 3, 6).reshape(-1, 1, 1, 1)
    grid = Grid(8, False)
    flat = w.flatten(1)
    scale, zp = qparams(flat.amin(1), flat.amax(1), grid)
    ours = fake_quantize(w, scale, zp, grid, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, grid.qmin, grid.qmax)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_symmetric_grid_is_narrow_and_integers_round_trip():
    g = Grid(8, True)
    assert (g.qmin, g.qmax) == (-127, 127)
    q = torch.arange(-127, 128)
    s = torch.tensor(0.37)
    assert torch.equal(quantize(dequantize(q, s, torch.tensor(0)), s, torch.tensor(0), g), q)


def test_round_half_away_is_c_round():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3]
    assert torch.round(x).tolist() == [-2, -2, -0, 0, 2, 2]


@pytest.mark.parametrize(
    "cin,x_bound", [(32, 255), (960, 255), (3000, 255), (960, 40000), (8, 2**21)]
)
def test_exact_integer_op_equals_float64(cin, x_bound):
    """The integer-exact simulation's float32 fast path (with the hi/lo split where one pass
    could overflow 2^24) gives the float64 result bit for bit."""
    from dfq.quant.modules import exact_integer_op

    g = torch.Generator().manual_seed(cin)
    x = torch.randint(-x_bound, x_bound + 1, (2, cin, 9, 9), generator=g).float()
    w = torch.randint(-127, 128, (16, cin, 3, 3), generator=g).float()
    assert torch.equal(exact_integer_op(F.conv2d, x, w).double(), F.conv2d(x.double(), w.double()))
    xl = x.flatten(1)
    wl = torch.randint(-127, 128, (10, xl.shape[1]), generator=g).float()
    assert torch.equal(
        exact_integer_op(F.linear, xl, wl).double(), F.linear(xl.double(), wl.double())
    )


@pytest.mark.parametrize("symmetric", [False, True])
def test_learnable_fake_quant_is_lsq_in_float32_and_float64(symmetric):
    """Value = fake_quantize; gradient: 1 for x inside the grid, 0 outside; for the scale
    round(x/s) - x/s inside, the clamped level outside (LSQ). Values that round onto qmin or
    qmax are inside. float32 (PyTorch's fused kernel) and float64 (an expression) agree."""
    grid = Grid(bits=4, symmetric=symmetric)
    zp = torch.tensor(0 if symmetric else 5)
    scale = 0.3
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(20000, dtype=torch.float64, generator=gen) * 2
    # and values that round exactly onto the grid's ends
    x64 = torch.cat([x64, (torch.tensor([grid.qmin, grid.qmax]) - zp + 0.3) * scale])
    u = x64 / scale
    levels = torch.round(u) + zp
    inside = (levels >= grid.qmin) & (levels <= grid.qmax)
    clamped = levels.clamp(grid.qmin, grid.qmax) - zp
    expected_ds = torch.where(inside, torch.round(u) - u, clamped).sum()
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        s = torch.tensor(scale, dtype=dtype, requires_grad=True)
        y = fake_quantize_ste(x, s, zp, grid)
        y.sum().backward()
        reference = fake_quantize(x.detach(), s.detach(), zp, grid)
        assert torch.allclose(y.detach(), reference, atol=1e-6)
        assert torch.equal(x.grad, inside.to(dtype))
        assert float(s.grad) == pytest.approx(float(expected_ds), rel=1e-4)


@settings(max_examples=50, deadline=None)
@given(grids, bounds, st.integers(0, 2**31 - 1))
def test_act_quant_equals_torch_fake_quant_with_and_without_grad(grid, lohi, seed):
    """ActQuant's no-grad path (its own vectorised arithmetic) gives torch's kernel's numbers
    bit for bit, ties and out-of-range values included; with grad it is that kernel (STE)."""
    from dfq.quant.modules import ActQuant

    lo, hi = lohi
    assume(hi - lo > 1e-6 or hi == lo)  # (scales of 1e-40 make both overflow, differently)
    scale, zp = qparams(torch.tensor(lo), torch.tensor(hi), grid)
    aq = ActQuant(grid)
    aq.set_range(scale, zp)
    gen = torch.Generator().manual_seed(seed)
    k = torch.arange(grid.qmin - 3, grid.qmax + 4, dtype=torch.float32)[:4000]
    x = torch.cat(
        [
            torch.empty(5000).uniform_(2 * lo - 1, 2 * hi + 1, generator=gen),
            (k - int(zp) + 0.5) * aq.scale,  # exact ties of x / scale
            torch.tensor([float("inf"), -float("inf"), 1e30, -1e30]),
        ]
    )
    ref = torch.fake_quantize_per_tensor_affine(x, aq.scale, int(zp), grid.qmin, grid.qmax)
    with torch.no_grad():
        assert torch.equal(aq(x), ref)
    xg = x.clone().requires_grad_(True)
    y = aq(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), ref)
    level = torch.round(x * (1.0 / aq.scale)) + int(zp)
    assert torch.equal(xg.grad, ((level >= grid.qmin) & (level <= grid.qmax)).float())
