"""Below 8 bits, models deploy in int8 containers: onnxruntime and ncnn run W4A8, W6A8, W6A6 and
W4A4 models (round to nearest, or after reconstruction) and compute what the simulation computes.
Activations below 8 bits are clipped to their levels (a uint8 Clip after QuantizeLinear, a float
Clip before the ncnn int8 layer)."""

from __future__ import annotations

import pytest
import torch

from dfq import PipelineConfig, QuantConfig, quantize_model
from dfq.config import ReconstructConfig
from dfq.quant.modules import ActQuant

pytest.importorskip("onnxruntime")
pytest.importorskip("ncnn")
pytest.importorskip("pnnx")

from dfq.runtimes.ncnn.export import export_ncnn  # noqa: E402
from dfq.runtimes.ncnn.runner import NcnnRunner  # noqa: E402
from dfq.runtimes.ort.export import export_onnx  # noqa: E402
from dfq.runtimes.ort.runner import OrtRunner  # noqa: E402

SHAPE = (1, 3, 16, 16)


def _runtime(target, model, tmp_path):
    if target == "ort":
        info = export_onnx(model, tmp_path / "m.onnx", SHAPE)
        return OrtRunner(info.path, threads=1)
    info = export_ncnn(model, tmp_path / "m", SHAPE)
    return NcnnRunner(info.param, info.bin, threads=1)


@pytest.mark.parametrize("target", ["ort", "ncnn"])
@pytest.mark.parametrize(
    "bits_weight, bits_activation, reconstruct, input_bits",
    [
        (4, 8, False, None),
        (6, 8, False, None),
        (4, 8, True, None),
        (6, 6, False, None),  # the image at 8 bits, the rest at 6
        (6, 6, False, 6),
        (4, 4, False, 4),
        (4, 6, True, 6),
    ],
)
def test_low_bit_models_run_as_simulated(
    small_net, tmp_path, target, bits_weight, bits_activation, reconstruct, input_bits
):
    g = torch.Generator().manual_seed(3)
    calib = [torch.randn(16, 3, 16, 16, generator=g)]
    config = PipelineConfig(
        equalize=True,
        correction=True,
        reconstruct=reconstruct,
        reconstruction=ReconstructConfig(iterations=20, batch_size=8),
        quant=QuantConfig(
            target=target,
            bits_weight=bits_weight,
            bits_activation=bits_activation,
            per_channel=True,
            input_bits=input_bits,
        ),
    )
    r = quantize_model(small_net, config, calib_data=calib if reconstruct else None)
    levels = 2 ** (bits_weight - 1) - 1
    for name, layer in r.layers.items():
        if layer.bits_weight is not None:
            assert layer.bits_weight == bits_weight, name
    weights = [m for m in r.model.modules() if hasattr(m, "int_weight")]
    assert weights and all(int(m.int_weight().abs().max()) <= levels for m in weights)
    acts = {n: m for n, m in r.model.named_modules() if isinstance(m, ActQuant) and m.quantizing}
    assert acts.pop("act_quant_x").grid.bits == (input_bits or max(bits_activation, 8))
    assert acts and all(m.grid.bits == bits_activation for m in acts.values())
    x = torch.randn(64, 3, 16, 16, generator=g)
    with torch.no_grad():
        sim = r.model(x)
    got = _runtime(target, r.model, tmp_path)(x)
    assert (got.argmax(1) == sim.argmax(1)).all()
    assert (got - sim).abs().max() <= 1e-5 * sim.abs().max()
