"""DeepLab-v3+ MobileNetV2 and MobileNetV2 SSD-Lite: checkpoint key names, sizes, tracing,
evaluate().

The expected state-dict layouts below are written out from the public sources
(jfzhang95/pytorch-deeplab-xception modeling/, qfgaohao/pytorch-ssd vision/), not from our
model code, so a renamed or reshaped layer fails here before it fails on a real checkpoint.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from voc_fixture import make_voc

from dfq.models import available, build
from dfq.models.blocks import MOBILENETV2_STAGES
from dfq.tasks import detection as det
from dfq.tasks import segmentation as seg


def bn(prefix, c):
    keys = {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
    keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def inverted_residual(prefix, inp, oup, t):
    """Both repositories' block: one flat `conv` Sequential; ReLU6 slots (2, 5) have no keys."""
    hid = round(inp * t)
    if t == 1:
        return {
            f"{prefix}.conv.0.weight": (hid, 1, 3, 3),
            **bn(f"{prefix}.conv.1", hid),
            f"{prefix}.conv.3.weight": (oup, hid, 1, 1),
            **bn(f"{prefix}.conv.4", oup),
        }
    return {f"{prefix}.conv.0.weight": (hid, inp, 1, 1), **bn(f"{prefix}.conv.1", hid),
            f"{prefix}.conv.3.weight": (hid, 1, 3, 3), **bn(f"{prefix}.conv.4", hid),
            f"{prefix}.conv.6.weight": (oup, hid, 1, 1), **bn(f"{prefix}.conv.7", oup)}  # fmt: skip


def mobilenetv2_blocks(prefix_of):
    """Layers 0..17 of MobileNetV2 `features`; prefix_of(i) names layer i."""
    keys = {f"{prefix_of(0)}.0.weight": (32, 3, 3, 3), **bn(f"{prefix_of(0)}.1", 32)}
    i, inp = 1, 32
    for t, c, n, _ in MOBILENETV2_STAGES:
        for _ in range(n):
            keys.update(inverted_residual(prefix_of(i), inp, c, t))
            i, inp = i + 1, c
    return keys


def deeplab_keys(num_classes=21):
    keys = mobilenetv2_blocks(lambda i: f"backbone.features.{i}")
    # the backbone's slices low_level_features = features[0:4], high_level_features = features[4:]
    keys.update(
        mobilenetv2_blocks(lambda i: f"backbone.{'low' if i < 4 else 'high'}_level_features.{i}")
    )
    for k, size in ((1, 1), (2, 3), (3, 3), (4, 3)):
        keys.update(
            {
                f"aspp.aspp{k}.atrous_conv.weight": (256, 320, size, size),
                **bn(f"aspp.aspp{k}.bn", 256),
            }
        )
    keys.update(
        {"aspp.global_avg_pool.1.weight": (256, 320, 1, 1), **bn("aspp.global_avg_pool.2", 256)}
    )
    keys.update({"aspp.conv1.weight": (256, 1280, 1, 1), **bn("aspp.bn1", 256)})
    keys.update({"decoder.conv1.weight": (48, 24, 1, 1), **bn("decoder.bn1", 48)})
    keys.update({"decoder.last_conv.0.weight": (256, 304, 3, 3), **bn("decoder.last_conv.1", 256)})
    keys.update({"decoder.last_conv.3.weight": (256, 256, 3, 3), **bn("decoder.last_conv.4", 256)})
    keys.update(
        {
            "decoder.last_conv.6.weight": (num_classes, 256, 1, 1),
            "decoder.last_conv.6.bias": (num_classes,),
        }
    )
    return keys


def ssdlite_keys(num_classes=21):
    keys = mobilenetv2_blocks(lambda i: f"base_net.{i}")
    keys.update({"base_net.18.0.weight": (1280, 320, 1, 1), **bn("base_net.18.1", 1280)})
    for k, (inp, oup, t) in enumerate(
        [(1280, 512, 0.2), (512, 256, 0.25), (256, 256, 0.5), (256, 64, 0.25)]
    ):
        keys.update(inverted_residual(f"extras.{k}", inp, oup, t))
    for name, per_anchor in (("classification_headers", num_classes), ("regression_headers", 4)):
        out = 6 * per_anchor
        for k, c in enumerate(
            [576, 1280, 512, 256, 256]
        ):  # SeperableConv2d: dw (bias), BN, ReLU6, pw (bias)
            keys.update(
                {
                    f"{name}.{k}.0.weight": (c, 1, 3, 3),
                    f"{name}.{k}.0.bias": (c,),
                    **bn(f"{name}.{k}.1", c),
                    f"{name}.{k}.3.weight": (out, c, 1, 1),
                    f"{name}.{k}.3.bias": (out,),
                }
            )
        keys.update({f"{name}.5.weight": (out, 64, 1, 1), f"{name}.5.bias": (out,)})
    return keys


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def randomize_bn(model, seed=0):
    """Fresh BN is nearly the identity and would hide a wrong layer order."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_registered():
    assert {"deeplabv3plus_mobilenetv2", "ssdlite_mobilenetv2"} <= set(available())


def test_deeplab_state_dict_matches_jfzhang95():
    model = build("deeplabv3plus_mobilenetv2")
    assert shapes(model) == deeplab_keys()


def test_ssdlite_state_dict_matches_qfgaohao():
    model = build("ssdlite_mobilenetv2")
    assert shapes(model) == ssdlite_keys()
    assert "classification_headers.5.weight" in model.state_dict()  # last head: a plain 1x1 conv


def test_parameter_counts():
    # Backbones share their conv shapes with torchvision's MobileNetV2 (only the key names differ).
    features = torchvision.models.mobilenet_v2().features
    bn2 = 2  # affine parameters per BN channel

    aspp = 320 * 256 + 3 * 320 * 256 * 9 + 320 * 256 + 1280 * 256 + 6 * 256 * bn2
    decoder = 24 * 48 + 48 * bn2 + 304 * 256 * 9 + 256 * 256 * 9 + 2 * 256 * bn2 + 256 * 21 + 21
    deeplab = build("deeplabv3plus_mobilenetv2")
    assert n_params(deeplab) == n_params(features[:18]) + aspp + decoder == 5_816_053

    def ir(inp, oup, hid):  # expand pw, dw, project pw, each with BN
        return inp * hid + hid * bn2 + hid * 9 + hid * bn2 + hid * oup + oup * bn2

    extras = ir(1280, 512, 256) + ir(512, 256, 128) + ir(256, 256, 128) + ir(256, 64, 64)
    heads = sum(
        c * 9 + c + c * bn2 + c * o + o for c in (576, 1280, 512, 256, 256) for o in (126, 24)
    )
    heads += 64 * 126 + 126 + 64 * 24 + 24
    ssd = build("ssdlite_mobilenetv2")
    assert n_params(ssd) == n_params(features) + extras + heads == 3_388_228


def _fake_checkpoint(expected):
    """Random tensors under the published key names; aliases of one tensor get the same values."""
    g = torch.Generator().manual_seed(1)
    base = {}
    state = {}
    for key, shape in expected.items():
        canonical = key.replace("low_level_features", "features").replace(
            "high_level_features", "features"
        )
        if canonical not in base:
            base[canonical] = (
                torch.randint(0, 5, shape, generator=g)
                if key.endswith("tracked")
                else torch.rand(shape, generator=g) + 0.1
            )
        state[key] = base[canonical].clone()
    return state


@pytest.mark.parametrize(
    "name,expected",
    [("deeplabv3plus_mobilenetv2", deeplab_keys), ("ssdlite_mobilenetv2", ssdlite_keys)],
)
def test_published_layout_loads_strictly(name, expected):
    state = _fake_checkpoint(expected())
    model = build(name)
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_deeplab_shapes_and_trace():
    model = randomize_bn(build("deeplabv3plus_mobilenetv2"))
    x = torch.randn(1, 3, 33, 49)
    with torch.no_grad():
        high, low = model.backbone(torch.randn(1, 3, 129, 129))
        assert high.shape == (1, 320, 9, 9) and low.shape == (
            1,
            24,
            33,
            33,
        )  # output stride 16, low level 4
        out = model(x)
        assert out.shape == (1, 21, 33, 49)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), out)
    os8 = build("deeplabv3plus_mobilenetv2", output_stride=8).eval()
    with torch.no_grad():
        assert os8.backbone(torch.randn(1, 3, 129, 129))[0].shape == (1, 320, 17, 17)


def test_ssdlite_shapes_priors_and_trace():
    model = randomize_bn(build("ssdlite_mobilenetv2"))
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        sizes = [tuple(f.shape[1:]) for f in model._features(x)]
        conf, loc = model(x)
        traced = torch.fx.symbolic_trace(model)
        conf_t, loc_t = traced(x)
    assert sizes == [
        (576, 19, 19),
        (1280, 10, 10),
        (512, 5, 5),
        (256, 3, 3),
        (256, 2, 2),
        (64, 1, 1),
    ]
    assert [s[1] for s in sizes] == [spec.feature_map for spec in det.SSDLITE_SPECS]
    assert conf.shape == (1, 3000, 21) and loc.shape == (1, 3000, 4)
    assert len(det.ssd_priors()) == 3000
    torch.testing.assert_close(conf_t, conf)
    torch.testing.assert_close(loc_t, loc)


def test_segmentation_evaluate_runs_deeplab(tmp_path):
    make_voc(tmp_path)
    loader = DataLoader(seg.VOCSegmentationVal(tmp_path, crop_size=32), batch_size=3)
    traced = torch.fx.symbolic_trace(randomize_bn(build("deeplabv3plus_mobilenetv2"))).train()
    out = seg.evaluate(traced, loader)
    assert out["n"] == 3 and len(out["per_class_iou"]) == 21
    assert 0.0 <= out["miou"] <= 100.0
    assert (
        traced.training and traced.get_submodule("backbone.features.0.1").training
    )  # left as it was found


def test_detection_evaluate_runs_ssdlite(tmp_path):
    make_voc(tmp_path)
    loader = DataLoader(
        det.VOCDetectionEval(tmp_path, year="2007", split="test"),
        batch_size=3,
        collate_fn=det.collate,
    )
    out = det.evaluate(torch.fx.symbolic_trace(randomize_bn(build("ssdlite_mobilenetv2"))), loader)
    assert out["n"] == 3 and set(out["per_class_ap"]) == {"dog", "cat", "car"}
    assert 0.0 <= out["map12"] <= 100.0 and 0.0 <= out["map07"] <= 100.0
