"""Reconstruction (AdaRound + LSQ, block by block): weights stay on their integer grids, the
output error falls below round-to-nearest's, the same seed gives the same model, and blocks
follow the graph."""

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import CatNet, SmallNet, randomize_bn, resnet20_args, shared

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.cli import main
from dfq.config import ReconstructConfig
from dfq.errors import DfqError
from dfq.quant.modules import ActQuant, QuantizedLayer
from dfq.transforms.reconstruct import find_blocks


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: a second thread only costs (and stalls on busy cores)
    yield
    torch.set_num_threads(n)


def _setup(net=SmallNet, bits=(3, 4)):
    torch.manual_seed(0)
    model = randomize_bn(net())
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 3, 12, 12, generator=g) for _ in range(2)]
    held_out = torch.randn(64, 3, 12, 12, generator=g)
    base = PipelineConfig(
        correction=True,
        quant=QuantConfig(bits_weight=bits[0], bits_activation=bits[1], per_channel=True),
    )
    return model, data, held_out, base


def _rec(base, **kw):
    return dataclasses.replace(
        base, reconstruct=True, reconstruction=ReconstructConfig(**{"iterations": 60, **kw})
    )


def _mse(gm, model, x):
    with torch.no_grad():
        return float((gm(x) - model(x)).pow(2).mean())


def _on_grid(m) -> bool:
    q = m.int_weight()
    s = m.weight_scale.reshape(-1, *([1] * (q.dim() - 1))).double()
    z = m.weight_zero_point.reshape(s.shape)
    g = m.weight_grid
    inside = g.qmin <= int(q.min()) and int(q.max()) <= g.qmax
    return inside and torch.equal(m.weight, ((q - z).double() * s).float())


def test_toy_net_blocks_improve_and_weights_stay_on_the_grid():
    model, data, _, base = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rtn = quantize_model(model, base)
    rec = quantize_model(model, _rec(base), calib_data=data)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    blocks = rec.reconstruction
    assert all(b.mse_after <= b.mse_before for b in blocks.values())
    assert sum(b.learned and b.mse_after < 0.95 * b.mse_before for b in blocks.values()) >= 2
    changed = 0
    for name, m in rec.model.named_modules():
        if isinstance(m, QuantizedLayer):
            assert _on_grid(m)
            changed += int((m.int_weight() != rtn.model.get_submodule(name).int_weight()).sum())
    assert changed > 0  # some weights were rounded the other way
    scales = {n: float(m.scale) for n, m in rec.model.named_modules() if isinstance(m, ActQuant)}
    rtn_scales = {
        n: float(m.scale) for n, m in rtn.model.named_modules() if isinstance(m, ActQuant)
    }
    assert scales.keys() == rtn_scales.keys() and scales != rtn_scales  # LSQ moved step sizes
    assert rec.timings["reconstruct"] > 0


def test_undecided_roundings_are_reported_and_a_stronger_regulariser_decides_them():
    """At few iterations AdaRound's soft rounding is left between grid points; the report says
    how much, and a stronger regulariser (faster rounding steps) leaves less."""
    model, data, _, base = _setup()
    weak = quantize_model(model, _rec(base, iterations=20), calib_data=data).reconstruction
    strong = quantize_model(
        model, _rec(base, iterations=20, round_lr=0.2, round_weight=50.0), calib_data=data
    ).reconstruction
    share = lambda r: [b.undecided for b in r.values() if b.iterations]  # noqa: E731
    assert share(weak) and all(0 <= u <= 1 for u in share(weak))
    assert sum(share(weak)) > 0.1 and sum(share(strong)) < 0.5 * sum(share(weak))


@pytest.mark.slow
def test_resnet20_w4a4_logits_closer_to_fp32_than_round_to_nearest():
    """On a real network and real images, held-out logits move towards FP32."""
    from conftest import load_cifar_resnet

    from dfq.models import input_config
    from dfq.tasks.base import DataOptions
    from dfq.tasks.classification import load

    model = load_cifar_resnet(20)
    inputs = input_config("cifar_resnet20")
    batches = load(
        DataOptions(str(shared("cifar10_test10k_jpeg.npz")), limit=96, batch_size=32), inputs
    ).batches
    calib, held_out = [batches[0][0]], torch.cat([x for x, _ in batches[1:]])
    base = PipelineConfig(
        equalize=True,
        correction=True,
        input_mean=inputs.mean,
        input_std=inputs.std,
        quant=QuantConfig(bits_weight=4, bits_activation=4, per_channel=True),
    )
    rtn = quantize_model(model, base)
    rec = quantize_model(model, _rec(base, iterations=30, batch_size=16), calib_data=calib)
    assert _mse(rec.model, model, held_out) < 0.8 * _mse(rtn.model, model, held_out)
    assert all(_on_grid(m) for m in rec.model.modules() if isinstance(m, QuantizedLayer))


def test_same_seed_same_model_other_seed_other_model():
    model, data, _, base = _setup()
    a = quantize_model(model, _rec(base, iterations=30, fp_input_mix=0.5), calib_data=data)
    b = quantize_model(model, _rec(base, iterations=30, fp_input_mix=0.5), calib_data=data)
    c = quantize_model(model, _rec(base, iterations=30, fp_input_mix=0.5, seed=1), calib_data=data)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.reconstruction.keys() == b.reconstruction.keys()
    for k, v in b.reconstruction.items():
        v.seconds = a.reconstruction[k].seconds
        assert a.reconstruction[k] == v
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_mirror_learns_on_the_images_and_their_mirror_images():
    """mirror=True (the default) is the same reconstruction as mirror=False on the images
    followed by their left-right flips: nothing else changes."""
    model, data, _, base = _setup()
    x = torch.cat(data)
    mirrored = quantize_model(model, _rec(base, iterations=20), calib_data=[x])
    by_hand = quantize_model(
        model, _rec(base, iterations=20, mirror=False), calib_data=[x, x.flip(-1)]
    )
    plain = quantize_model(model, _rec(base, iterations=20, mirror=False), calib_data=[x])
    sm, sh, sp = (r.model.state_dict() for r in (mirrored, by_hand, plain))
    assert all(torch.equal(sm[k], sh[k]) for k in sm)
    assert any(not torch.equal(sm[k], sp[k]) for k in sm)


def test_windows_learn_local_blocks_and_global_ones_keep_whole_maps():
    """With `window`, the conv blocks learn on windows (named in the report), the pooled head
    keeps whole maps and says why, and the result still improves with weights on the grid."""
    model, _, _, base = _setup()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(2)]
    r = quantize_model(model, _rec(base, window=0.5), calib_data=data)
    blocks = r.reconstruction
    # 3x3 kernels: a margin of one pixel each side; the 1x1 head needs none
    assert [blocks[k].window for k in ("stem.0", "dw.0", "head.0")] == [
        "18x18 of 32x32",
        "18x18 of 32x32",
        "16x16 of 32x32",
    ]
    assert blocks["fc"].window is None and "2-d" in blocks["fc"].window_note
    assert all(b.mse_after <= b.mse_before for b in blocks.values())
    assert sum(b.learned for b in blocks.values()) >= 2
    assert all(_on_grid(m) for m in r.model.modules() if isinstance(m, QuantizedLayer))
    again = quantize_model(model, _rec(base, window=0.5), calib_data=data).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in r.model.state_dict().items())


def test_images_of_two_sizes_are_refused_by_name():
    model, data, _, base = _setup()
    mixed = [*data, torch.randn(4, 3, 20, 20)]
    with pytest.raises(DfqError, match=r"one size.*\(3, 12, 12\), \(3, 20, 20\)"):
        quantize_model(model, _rec(base), calib_data=mixed)


def test_blocks_follow_the_graph():
    model, _, _, base = _setup()
    gm = quantize_model(model, base).model
    blocks = find_blocks(gm)
    # the residual block (dw, pw, add) is one block; the others are single layers
    assert [b.layers for b in blocks] == [["stem.0"], ["dw.0", "pw.0"], ["head.0"], ["fc"]]
    seen = [n for b in blocks for n in b.nodes]
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    assert sorted(n.name for n in seen) == sorted(n.name for n in body)
    assert blocks[1].input.name == "stem_0" or blocks[1].input.name.startswith("act_quant")
    # concatenations with several live branches stay inside one block
    cat_gm = quantize_model(randomize_bn(CatNet()), base).model
    cat_blocks = find_blocks(cat_gm)
    assert ["a.0", "b.0", "c.0"] == sorted(l for b in cat_blocks for l in b.layers if l[0] in "abc")
    assert any({"a.0", "b.0", "c.0"} <= set(b.layers) for b in cat_blocks)


def test_time_cap_warns_and_reports_the_cut():
    model, data, _, base = _setup()
    with pytest.warns(UserWarning, match="`reconstruction.seconds`=.* cut"):
        r = quantize_model(model, _rec(base, iterations=100000, seconds=0.5), calib_data=data)
    assert any(b.cut_by_time for b in r.reconstruction.values())
    for m in r.model.modules():
        if isinstance(m, QuantizedLayer):  # cut or not, the weights are on their grid
            assert torch.equal(
                m.weight,
                m.int_weight()
                .double()
                .mul(m.weight_scale.reshape(-1, *([1] * (m.weight.dim() - 1))).double())
                .float(),
            )


def test_without_iterations_nothing_changes():
    model, data, held_out, base = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = quantize_model(model, _rec(base, iterations=0), calib_data=data)
    rtn = quantize_model(model, base)
    sr, s0 = r.model.state_dict(), rtn.model.state_dict()
    assert all(torch.equal(sr[k], s0[k]) for k in s0)
    assert not any(b.learned for b in r.reconstruction.values())


def test_cli_reconstruct_reports_blocks(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        [
            "cls",
            *resnet20_args(),
            "--data",
            str(shared("cifar10_foolbox20.npz")),
            "--quantize",
            "--per_channel",
            "--bits_weight",
            "4",
            "--bits_activation",
            "4",
            "--true_data",
            "16",
            "--reconstruct",
            "--reconstruct_iters",
            "4",
            "--reconstruct_round_lr",
            "0.05",
            "--reconstruct_round_weight",
            "2",
            "--limit",
            "8",
            "--quiet",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    assert "reconstruction: 11 blocks" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert list(r["reconstruction"])[:3] == ["conv1", "layer1.0", "layer1.1"]
    assert r["reconstruction"]["layer1.0"]["layers"] == ["layer1.0.conv1", "layer1.0.conv2"]
    rc = r["config"]["reconstruction"]
    assert r["config"]["reconstruct"] and rc["iterations"] == 4
    assert (rc["round_lr"], rc["round_weight"]) == (0.05, 2.0)
    assert 0 <= r["reconstruction"]["layer1.0"]["undecided"] <= 1
    assert "reconstruct" in r["timings"]


@pytest.mark.parametrize("bad", [{"round_lr": 0.0}, {"round_weight": -1.0}])
def test_bad_rounding_settings_are_refused_by_name(bad):
    with pytest.raises(DfqError, match="`reconstruction.round_lr`"):
        ReconstructConfig(**bad)
