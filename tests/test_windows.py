"""Spatial windows of local blocks (dfq.graph.windows): a window's valid outputs are exactly
the whole map's, every output pixel is reachable, and global ops are refused."""

import pytest
import torch
from torch import fx, nn

from dfq.graph.windows import plan_window, window_is_exact


class Local(nn.Module):
    """A strided 3x3 conv, a depthwise 3x3 and a 1x1 with a residual add (two output pixels
    of reach)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.down(x))
        return y + self.pw(torch.relu(self.dw(y)))


class Gated(Local):
    """The same with a squeeze-excitation gate: every output depends on the whole map."""

    def forward(self, x):
        y = super().forward(x)
        return y * torch.sigmoid(y.mean((2, 3), keepdim=True))


def _plan(net, x, fraction=0.3):
    gm = fx.symbolic_trace(net.double())
    with torch.no_grad():
        y = gm(x)
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    return gm, plan_window(gm, nodes, x.shape, y.shape, fraction)


def test_every_window_position_gives_the_whole_maps_outputs_and_covers_them():
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gm, (window, why) = _plan(Local(), x)
    assert window is not None, why
    assert window.stride == (2, 2) and window.margin == (2, 2)
    assert window.size[0] < 64 and window.size[1] < 48
    with torch.no_grad():
        ref = gm(x)
        covered = torch.zeros(ref.shape[2:], dtype=torch.bool)
        n = window.starts()
        for i in range(n[0]):
            for j in range(n[1]):
                inp, valid, full = window.at((i * 2, j * 2))
                out = gm(x[(..., *inp)])[(..., *valid)]
                torch.testing.assert_close(out, ref[(..., *full)], rtol=0, atol=1e-12)
                covered[full] = True
    assert bool(covered.all())  # the real borders are learned too (there the padding is real)
    assert window_is_exact(gm, window, x)


def test_a_margin_too_small_is_caught_by_the_check():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gm, (window, _) = _plan(Local(), x)
    import dataclasses

    thin = dataclasses.replace(window, margin=(0, 0))
    assert not window_is_exact(gm, thin, x)


def test_a_global_gate_keeps_whole_maps():
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    gm, (window, _) = _plan(Gated(), x)
    assert window is not None  # the plan sees only kernels ...
    assert not window_is_exact(gm, window, x)  # ... the check sees the gate


@pytest.mark.parametrize(
    "in_shape, out_shape, reason",
    [
        ((2, 8, 16, 16), (2, 10), "not a 2-d feature map"),
        ((2, 8, 15, 15), (2, 8, 8, 8), "whole multiple"),
        ((2, 8, 5, 5), (2, 8, 5, 5), "too small"),
    ],
)
def test_no_window_where_it_cannot_pay(in_shape, out_shape, reason):
    gm = fx.symbolic_trace(nn.Identity())
    window, why = plan_window(gm, [], torch.Size(in_shape), torch.Size(out_shape), 0.5)
    assert window is None and reason in why
