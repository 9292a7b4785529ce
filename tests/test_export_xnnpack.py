"""ExecuTorch / XNNPACK: the .pte dfq writes runs in ExecuTorch's runtime with XNNPACK's qs8
kernels and computes what the `--target xnnpack` simulation computes (skipped without the
extra)."""

from __future__ import annotations

import pytest
import torch
from runtime_nets import (
    ChainOfResiduals,
    Convs,
    Depthwise,
    HiddenLinear,
    PoolLinear,
    SiluSqueezeExcite,
    SqueezeExcite,
    TwoBranches,
    sim_and_runtime,
)
from torch import nn

from dfq.graph.modules import GlobalAvgPool

pytest.importorskip("executorch")


NETS = [Convs, Depthwise, PoolLinear, ChainOfResiduals, TwoBranches]


@pytest.mark.parametrize("net", NETS, ids=lambda c: c.__name__)
def test_xnnpack_equals_the_simulation_on_every_op_kind(net, tmp_path):
    """Every value, on convs, depthwise convs, global pool + linear and residual adds: XNNPACK's
    qs8 convolution requantizes the exact int32 sum with a float32 multiplier, as the
    simulation's `requant` does; a layer with no output quantizer runs in fp32."""
    result, files, sim, got = sim_and_runtime(net(), "xnnpack", tmp_path)
    assert (tmp_path / "m.pte").is_file() and files["delegates"] >= 1
    layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in net().modules())
    last = "fc" if net is PoolLinear else "c"
    assert files["float_layers"] == [last]  # no output quantizer: XNNPACK's fp32 layer
    assert files["int8_weights"] == layers - 1
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-5)


def test_a_linear_layer_read_through_a_flatten_runs_as_qs8(tmp_path):
    """MobileNetV3's classifier: XNNPACK took DQ -> flatten -> linear for a float input on int8
    weights and saturated every output; the export quantizes again after the flatten."""
    result, files, sim, got = sim_and_runtime(HiddenLinear(), "xnnpack", tmp_path)
    assert files["float_layers"] == ["fc2"] and files["int8_weights"] == 2
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-5)


@pytest.mark.parametrize("net, hw", [(SqueezeExcite, 16), (SiluSqueezeExcite, 6)])
def test_global_means_round_as_xnnpack_qs8_mean(net, hw, tmp_path):
    """Squeeze-excitation gates (MobileNetV3's on a Hardswish output, EfficientNet's SiLU one
    at 6 x 6): XNNPACK's qs8 mean rounds its ties with the output zero point added and with a
    multiplier rounded once to float32, and so does the simulation; onnxruntime's rounding
    differs from the runtime on these nets. (6-std ranges: their grids put the SiLU net's means
    on XNNPACK's ties, which the last assert needs.)"""
    result, files, sim, got = sim_and_runtime(net(), "xnnpack", tmp_path, hw, range_rule="std")
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-5)
    pools = [m for m in result.model.modules() if isinstance(m, GlobalAvgPool)]
    assert pools and all(m.xnnpack_mean for m in pools)
    for m in pools:
        m.xnnpack_mean = False
    x = torch.randn(64, 3, hw, hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (result.model(x) - got).abs().max() > 1e-3


def _xnnpack_add(a_grid, b_grid, out_grid, shape):
    """ExecuTorch's XNNPACK delegate on one quantized add (each grid: scale, int8 zero point),
    as the PT2E graph dfq's exporter writes for a residual add."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    ops = torch.ops.quantized_decomposed

    def qdq(x, grid):
        q = ops.quantize_per_tensor(x, *grid, -128, 127, torch.int8)
        return ops.dequantize_per_tensor(q, *grid, -128, 127, torch.int8)

    class Add(nn.Module):
        def forward(self, a, b):
            return qdq(qdq(a, a_grid) + qdq(b, b_grid), out_grid)

    example = (torch.zeros(shape), torch.zeros(shape))
    program = to_edge_transform_and_lower(
        torch.export.export(Add(), example), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    return Runtime.get().load_program(program.buffer).load_method("forward")


def test_adds_round_as_xnnpack_qs8_add_on_every_integer_pair():
    """XNNPACK's qs8 add is fixed-point (20-bit multipliers, half a unit added, shift right): on
    the grids of MobileNetV2's features.5 add, every one of the 65536 int8 pairs comes out as
    `IntegerAdd` computes, where a float add then a quantizer misses the near-ties."""
    from dfq.quant.modules import AddGrids, IntegerAdd

    sa, za = 0.03618265688419342, 127  # dfq's uint8 grids
    sb, zb = 0.02698253095149994, 128
    so, zo = 0.039613984525203705, 128
    ia, ib = torch.meshgrid(torch.arange(256.0) - za, torch.arange(256.0) - zb, indexing="ij")
    a, b = (ia * sa)[None, None], (ib * sb)[None, None]
    run = _xnnpack_add((sa, za - 128), (sb, zb - 128), (so, zo - 128), a.shape)
    got = run.execute([a, b])[0]
    add = IntegerAdd("xnnpack")
    add.requant = AddGrids(sa, za, sb, zb, so, zo, 0, 255)
    torch.testing.assert_close(add(a, b), got, rtol=0, atol=0)
    float_add = torch.round(((a + b) / so).clamp(-zo, 255 - zo)) * so
    assert (float_add - got).abs().max() > so / 2  # the teeth: a float add rounds ties otherwise
