"""ExecuTorch / XNNPACK: the .pte dfq writes runs in ExecuTorch's runtime with XNNPACK's qs8
kernels and computes what the `--target xnnpack` simulation computes (skipped without the
extra)."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_bn
from test_export_openvino import ChainOfResiduals, Convs, Depthwise, PoolLinear, TwoBranches
from torch import nn

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.runtimes import profile

pytest.importorskip("executorch")


def _sim_and_xnnpack(net: nn.Module, tmp_path):
    torch.manual_seed(1)
    model = randomize_bn(net).eval()
    result = quantize_model(model, PipelineConfig(quant=QuantConfig(target="xnnpack")))
    runtime = profile("xnnpack")
    files = runtime.export(result.model, tmp_path / "m", (1, 3, 16, 16))
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return result, files, result.model(x), runtime.runner(files)(x)


NETS = [Convs, Depthwise, PoolLinear, ChainOfResiduals, TwoBranches]


@pytest.mark.parametrize("net", NETS, ids=lambda c: c.__name__)
def test_xnnpack_equals_the_simulation_on_every_op_kind(net, tmp_path):
    """Every value, on convs, depthwise convs, global pool + linear and residual adds: XNNPACK's
    qs8 convolution requantizes the exact int32 sum with a float32 multiplier, as the
    simulation's `requant` does; a layer with no output quantizer runs in fp32."""
    result, files, sim, got = _sim_and_xnnpack(net(), tmp_path)
    assert (tmp_path / "m.pte").is_file() and files["delegates"] >= 1
    layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in net().modules())
    last = "fc" if net is PoolLinear else "c"
    assert files["float_layers"] == [last]  # no output quantizer: XNNPACK's fp32 layer
    assert files["int8_weights"] == layers - 1
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-5)
