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
    PoolLinear,
    TwoBranches,
    sim_and_runtime,
)
from torch import nn

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
