"""The whole pipeline on small models: quantized output quality, grids, determinism, no mutation."""

import torch
from conftest import SmallNet, randomize_bn
from torch import fx

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.quant.modules import ActQuant, QuantizedLayer
from dfq.quant.primitives import sqnr_db


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}, m.training


def test_pipeline_does_not_touch_the_users_model(small_net):
    small_net.train()
    before, mode = _snapshot(small_net)
    quantize_model(
        small_net, PipelineConfig(relu=True, equalize=True, correction=True, clip_weight=15.0)
    )
    after, mode_after = _snapshot(small_net)
    assert mode_after == mode and all(torch.equal(before[k], after[k]) for k in before)


def test_float_transforms_keep_output_float64(small_net):
    m = small_net.double()
    cfg = PipelineConfig(quantize=False, equalize=True, absorption=False)
    res = quantize_model(m, cfg)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert (res.model(x) - m(x)).abs().max() <= 1e-6


def test_w8a8_output_is_close_and_higher_bits_are_closer(small_net):
    x = torch.randn(16, 3, 16, 16)
    ref = small_net(x)
    sq = {}
    for bits in (4, 8):
        cfg = PipelineConfig(
            quantize=True,
            relu=False,
            correction=True,
            quant=QuantConfig(bits_weight=bits, bits_activation=bits),
        )
        sq[bits] = sqnr_db(ref, quantize_model(small_net, cfg).model(x))
    assert sq[8] > 25 and sq[8] > sq[4] + 10


def test_weights_and_activations_sit_on_their_grids(small_net):
    res = quantize_model(small_net, PipelineConfig(correction=True))
    gm = res.model
    for m in gm.modules():
        if isinstance(m, QuantizedLayer):
            q = m.int_weight()
            assert q.abs().max() <= 127
            assert torch.allclose(
                q.double() * m.weight_scale.double(), m.weight.double(), atol=1e-6
            )
            b = m.int_bias()
            assert torch.allclose(b.double() * m.bias_scale, m.bias.double(), atol=1e-6)
    aqs = [m for m in gm.modules() if isinstance(m, ActQuant)]
    # input, stem, dw, pw, add, head, and the pool's requantization; the logits stay float
    assert len(aqs) == 7
    assert all(a.quantizing and a.scale > 0 for a in aqs)


def test_int32_bias_scale_is_input_times_weight_scale(small_net):
    res = quantize_model(small_net, PipelineConfig())
    gm = res.model
    aq = gm.get_submodule("act_quant_stem_2")
    dw = gm.get_submodule("dw.0")
    assert torch.allclose(dw.bias_scale, aq.scale.double() * dw.weight_scale.double())


def test_same_config_gives_bit_identical_models(small_net):
    cfg = PipelineConfig(relu=True, equalize=True, correction=True)
    a = quantize_model(small_net, cfg).model.state_dict()
    b = quantize_model(small_net, cfg).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_calibration_ranges_come_from_data(small_net):
    data = [torch.randn(8, 3, 16, 16) * 5]
    res = quantize_model(small_net, PipelineConfig(calib=8), calib_data=data)
    stem = small_net.stem(data[0])
    assert res.activations["stem_2"].activation_range == [0.0, round(float(stem.max()), 4)]
    # the input's range is known exactly from the normalisation, whatever the data spans
    assert res.activations["x"].activation_range == [-2.1179, 2.64]


def test_percentile_ranges_are_inside_min_max(small_net):
    data = [torch.randn(8, 3, 16, 16)]
    full = quantize_model(small_net, PipelineConfig(calib=8), calib_data=data).activations
    pct = quantize_model(
        small_net, PipelineConfig(calib=8, range_percentile=99.0), calib_data=data
    ).activations
    assert pct["stem_2"].activation_range[1] < full["stem_2"].activation_range[1]


def test_empirical_bias_correction_on_data(small_net):
    data = [torch.randn(16, 3, 16, 16)]
    res = quantize_model(small_net, PipelineConfig(correction="distill", calib=16), calib_data=data)
    assert res.config.correction == "data"
    assert res.layers["stem.0"].bias_correction == "empirical"


def test_per_channel_and_asymmetric_weights(small_net):
    cfg = PipelineConfig(quant=QuantConfig(per_channel=True, weight_symmetric=False))
    gm = quantize_model(small_net, cfg).model
    m = gm.get_submodule("stem.0")
    assert m.weight_scale.shape == (8,) and m.weight_axis == 0
    assert m.int_weight().min() >= 0 and m.int_weight().max() <= 255


def test_result_is_a_graph_module_with_the_same_signature(small_net):
    res = quantize_model(small_net, PipelineConfig())
    assert isinstance(res.model, fx.GraphModule)
    assert res.model(torch.randn(1, 3, 8, 8)).shape == (1, 5)
    assert set(res.timings) >= {"trace", "fold_bn", "quantize_weights", "total"}


def test_linear_without_bn_gets_moments_propagated():
    m = randomize_bn(SmallNet())
    res = quantize_model(m, PipelineConfig(correction=True))
    assert res.layers["fc"].bias_correction_max is not None


def test_default_steps_are_the_timed_ones(small_net):
    from dfq import runtimes
    from dfq.pipeline import Step, build_steps

    cfg = PipelineConfig(relu=True, equalize=True, correction=True, clip_weight=15.0)
    res = quantize_model(small_net, cfg)
    steps = build_steps(res.config, runtimes.profile(cfg.quant.target))
    assert all(isinstance(s, Step) for s in steps)
    assert [s.name for s in steps] + ["total"] == list(res.timings)


def test_a_custom_step_list_runs(small_net):
    from dfq.records import LayerRecord, Transformed

    class Count:
        """A user step after folding: notes each layer's weight count."""

        name, needs_data, report = "count", False, "layers"

        def __call__(self, state):
            notes = {
                n: LayerRecord(extra={"weights": int(m.weight.numel())})
                for n, m in _weighted(state.gm)
            }
            return Transformed(state.gm, state.stats, notes)

    def edit(default):
        names = [s.name for s in default]
        assert "bias_correction" in names
        steps = [s for s in default if s.name != "bias_correction"]
        steps.insert(names.index("fold_bn") + 1, Count())
        return steps

    x = torch.randn(4, 3, 16, 16)
    cfg = PipelineConfig(correction=True)
    res = quantize_model(small_net, cfg, steps=edit)
    assert "count" in res.timings and "bias_correction" not in res.timings
    assert list(res.timings).index("count") == list(res.timings).index("fold_bn") + 1
    assert res.layers and all("weights" in v.extra for v in res.layers.values())
    assert not any(v.is_set("bias_correction_max") for v in res.layers.values())
    # the same as the default pipeline without bias correction
    plain = quantize_model(small_net, PipelineConfig(correction=False))
    assert torch.equal(res.model(x), plain.model(x))


def test_a_step_that_needs_data_refuses_to_run_without(small_net):
    import pytest

    from dfq.pipeline import CorrectBiasOnData

    with pytest.raises(ValueError, match="bias_correction"):
        quantize_model(
            small_net, PipelineConfig(), steps=lambda d: [*d[:-2], CorrectBiasOnData(), *d[-2:]]
        )


def _weighted(gm):
    from dfq.graph.ops import weighted_module

    for node in gm.graph.nodes:
        m = weighted_module(gm, node)
        if m is not None:
            yield node.target, m
