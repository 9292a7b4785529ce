"""The invariants every random architecture must satisfy (shared by tests/test_fuzz.py and
benchmarks/fuzz.py). Each check raises `InvariantError` naming what broke; any other
exception out of dfq is a crash.

1. The user's model object is unchanged: parameters, buffers, every module's training flag.
2. Float invariance (float64): BN folding + cross-layer equalization (no absorption) leave the
   output unchanged: max |y' - y| <= 1e-6 * max(1, max |y|).
3. High-bias absorption is exact wherever its premise holds (every absorbed channel's shifted
   pre-activation x - c >= 0, so ReLU(x - c) = ReLU(x) - c): then the same 1e-6 bound; where
   the premise fails on the input, the output only has to be finite.
4. Quantized, activation ranges calibrated on the input itself (so nothing is clipped and the
   error is pure rounding): SQNR(y, y_q) >= 6.02 * b - QUANT_SLACK_DB, b the bit width.
   6.02 dB per bit is the rounding noise of one uniform quantizer over its range; the slack
   pays for what random nets legitimately add on top: crest factors of per-tensor ranges
   (a huge-gamma channel sets the grid for all channels, dead/tiny channels get nothing), the
   noise of up to ~15 quantizers adding up, and gain through the layers. So 8 bits has to give
   >= 8 dB (the output is recognisably the same) and 16 bits >= 56 dB: a real bug (a wrong
   scale, zero point, bias grid or a mis-wired quantizer) costs far more than 40 dB at 16
   bits, whereas no legitimate effect does. Except two: BN gammas of 1e3 compound (two in a
   row give one channel a 1e6 range on a per-tensor grid that other channels share), which
   no bit width <= 16 resolves, and tiny gammas that equalization blows up; see
   `bound_applies`: those architectures get every other check but not this bound.
5. Quantized, data-free (BN-based ranges, every switch drawn at random): no exception, output
   finite and of the float model's shape (no accuracy bound: random BN statistics do not
   describe random inputs, so data-free ranges clip arbitrarily; that is not a bug).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from strategies import build, example_input
from torch import nn

from dfq import EqualizeConfig, PipelineConfig, QuantConfig, quantize_model
from dfq.quant.primitives import sqnr_db

FLOAT_TOL = 1e-6
QUANT_SLACK_DB = 40.0


class InvariantError(AssertionError):
    pass


def quant_bound_db(bits: int) -> float:
    return 6.02 * bits - QUANT_SLACK_DB


def bound_applies(spec: dict, bits: int) -> bool:
    """Where the SQNR bound is asserted (see the module docstring); not with
    - huge (1e3) gammas: they compound (two in a row: a 1e6 range on one per-tensor grid that
      other channels share, beyond even 16 bits);
    - tiny (1e-6) gammas: such a channel is a near-constant beta; cross-layer equalization sees
      only its ~0 weight range and scales it up by 1/s ~ 1e3..1e4, so the constant then sets
      the per-tensor activation grid (and its share of the next layer's weights underflows)
      unless high-bias absorption can take it (not across zero padding). A known CLE weakness
      (reported), up to ~60 dB: the output is poor even at 16 bits, but not wrong."""
    text = json.dumps(spec)
    return '"huge"' not in text and '"tiny"' not in text


def snapshot(model: nn.Module) -> tuple[dict, list[bool]]:
    return (
        {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        [m.training for m in model.modules()],
    )


def check_unchanged(model: nn.Module, before: tuple[dict, list[bool]], what: str) -> None:
    state, modes = before
    now = model.state_dict(keep_vars=True)
    if now.keys() != state.keys():
        raise InvariantError(
            f"{what}: the user's model gained/lost tensors: {set(now) ^ set(state)}"
        )
    for k, v in state.items():
        if (
            now[k].dtype != v.dtype
            or now[k].shape != v.shape
            or not torch.equal(now[k].detach(), v)
        ):
            raise InvariantError(f"{what}: the user's model tensor {k} changed")
    if [m.training for m in model.modules()] != modes:
        raise InvariantError(f"{what}: the user's model training flags changed")


def _finite(y: torch.Tensor, what: str) -> None:
    if not torch.isfinite(y).all():
        raise InvariantError(f"{what}: output has {int((~torch.isfinite(y)).sum())} NaN/Inf values")


def _max_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / max(1.0, float(ref.abs().max())))


def _absorption_premise_holds(res_abs, res_plain, x: torch.Tensor) -> bool:
    """Do all absorbed channels see x - c >= 0 on this input (so absorption is exact)?"""
    shifts = {}
    for name, notes in res_abs.layers.items():
        if notes.absorbed_channels:
            b_abs = res_abs.float_model.get_submodule(name).bias.detach()
            b_plain = res_plain.float_model.get_submodule(name).bias.detach()
            shifts[name] = (b_plain - b_abs) > 0
    if not shifts:
        return True
    ok = [True]
    gm = res_abs.float_model
    hooks = [
        gm.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, mask=mask: ok.__setitem__(
                0, ok[0] and bool((out.transpose(0, 1)[mask] >= 0).all())
            )
        )
        for n, mask in shifts.items()
    ]
    try:
        with torch.no_grad():
            gm(x)
    finally:
        for h in hooks:
            h.remove()
    return ok[0]


def random_quant_config(r) -> PipelineConfig:
    """Every pipeline switch at random (r: a random.Random or compatible Draw)."""
    target = r.choice(["generic", "generic", "generic", "ort", "ncnn"])
    bits_w = r.choice([2, 4, 6, 8, 8, 8, 16]) if target == "generic" else r.choice([4, 8])
    bits_a = r.choice([4, 8, 8, 16]) if target == "generic" else 8
    eq = r.choice([False, True])
    q = QuantConfig(
        bits_weight=bits_w,
        bits_activation=bits_a,
        per_channel=r.choice([False, True]),
        bits_bias=r.choice([8, 16, 32, 32]) if target == "generic" else 32,
        weight_symmetric=True if target != "generic" else r.choice([True, True, False]),
        activation_symmetric=r.choice([False, True]),
        target=target,
        reduce_range=False,
    )
    return PipelineConfig(
        quantize=True,
        relu=r.choice([False, True]),
        equalize=eq,
        absorption=r.choice([None, False]) if eq else None,
        correction=r.choice([False, "bn"]),
        clip_weight=r.choice([None, None, 15.0]),
        range_std=r.choice([6.0, 3.0]),
        quant=q,
    )


def check_architecture(
    spec: dict, config: PipelineConfig, bits: int = 8, train_mode: bool = False
) -> dict[str, Any]:
    """Run every invariant on the architecture `spec`; return figures (errors, SQNR)."""
    out: dict[str, Any] = {}
    model = build(spec)
    if train_mode:
        model.train()
    x = example_input(spec)
    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = ref_model(x)
    if not torch.isfinite(ref).all():  # not a dfq problem: the drawn model itself overflows
        out["skipped"] = "float model output not finite"
        return out

    # 1 + 2: float invariance in float64; the user's (float32) model untouched throughout
    before = snapshot(model)
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    with torch.no_grad():
        ref64 = copy.deepcopy(m64).eval()(x64)
    # every equalization option at once: pairs (ReLU6 kept exactly), activation-aware scales,
    # and the streams around residual adds
    every = EqualizeConfig(activation_aware=True, residual_regions=True)
    plain = quantize_model(
        m64, PipelineConfig(quantize=False, equalize=True, absorption=False, equalization=every)
    )
    with torch.no_grad():
        y = plain.model(x64)
    _finite(y, "fold+equalize")
    out["float_err"] = _max_err(y, ref64)
    if out["float_err"] > FLOAT_TOL:
        raise InvariantError(
            f"fold+equalize changed the float64 output by {out['float_err']:.3g} (> {FLOAT_TOL})"
        )

    # 3: absorption, exact where its premise holds
    absorbed = quantize_model(m64, PipelineConfig(quantize=False, equalize=True, absorption=True))
    with torch.no_grad():
        y = absorbed.model(x64)
    _finite(y, "absorption")
    out["absorb_err"] = _max_err(y, ref64)
    out["absorb_exact"] = _absorption_premise_holds(absorbed, plain, x64)
    if out["absorb_exact"] and out["absorb_err"] > FLOAT_TOL:
        raise InvariantError(
            f"absorption changed the float64 output by {out['absorb_err']:.3g} although "
            "every absorbed channel stayed above its shift"
        )

    # 4: quantized with calibrated ranges: bound from the bit width
    qc = PipelineConfig(
        quantize=True,
        equalize=True,
        correction="bn",
        calib=len(x),
        quant=QuantConfig(bits_weight=bits, bits_activation=bits),
    )
    res = quantize_model(model, qc, calib_data=[x])
    with torch.no_grad():
        yq = res.model(x)
    _finite(yq, f"W{bits}A{bits} calibrated")
    if yq.shape != ref.shape:
        raise InvariantError(f"quantized output shape {tuple(yq.shape)} != {tuple(ref.shape)}")
    out["sqnr_db"] = sqnr_db(ref, yq)
    out["bounded"] = bound_applies(spec, bits)
    if out["bounded"] and out["sqnr_db"] < quant_bound_db(bits):
        raise InvariantError(
            f"W{bits}A{bits} (calibrated ranges) SQNR {out['sqnr_db']:.1f} dB < "
            f"bound {quant_bound_db(bits):.1f} dB"
        )

    # 5: data-free, random switches
    res = quantize_model(model, config)
    with torch.no_grad():
        yq = res.model(x)
    _finite(yq, "data-free quantized")
    if yq.shape != ref.shape:
        raise InvariantError(
            f"data-free quantized output shape {tuple(yq.shape)} != {tuple(ref.shape)}"
        )
    out["datafree_sqnr_db"] = sqnr_db(ref, yq)

    check_unchanged(model, before, "after the pipeline")
    if model.training != train_mode:
        raise InvariantError("the user's model training flag changed")
    return out
