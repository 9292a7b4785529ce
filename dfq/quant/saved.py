"""Saving a quantized result and reusing it: reconstruction takes minutes, evaluation and
export should not repeat it.

The file holds the pipeline config and the fake-quant model's state (integer-grid weights,
scales, biases, activation step sizes) and each activation quantizer's mode. Loading runs the
pipeline again with the same config on the same float model, data-free, which rebuilds the same
graph, and puts the saved state in place of the data-driven steps (`quantize_model(restore=)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx

from dfq.config import PipelineConfig
from dfq.errors import DfqError
from dfq.quant.modules import ActQuant
from dfq.records import Records

FORMAT = "dfq-quantized-v1"


def save_quantized(
    path: str | Path,
    model: fx.GraphModule,
    config: PipelineConfig,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write `model` (a quantize_model result's model) and its `config` to `path`."""
    modes = {k: m.mode for k, m in model.named_modules() if isinstance(m, ActQuant)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": FORMAT,
            "config": config.to_dict(),
            "state": state,
            "modes": modes,
            "meta": meta or {},
        },
        path,
    )


def load_quantized(path: str | Path) -> tuple[PipelineConfig, dict[str, Any]]:
    """The config and the `restore` argument of quantize_model, from what save_quantized wrote."""
    fix = "save it again with `save_quantized`"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DfqError(f"Quantized model file '{path}' does not exist.", "check the path") from None
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise DfqError(
            f"'{path}' is not a readable quantized-model file ({type(e).__name__}).", fix
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DfqError(f"'{path}' is not a dfq quantized-model file.", fix)
    quant = blob["config"].setdefault("quant", {})
    # files from before `input_bits` quantized the network input like every activation
    quant.setdefault("input_bits", quant.get("bits_activation", 8))
    return PipelineConfig.from_dict(blob["config"]), {
        "state": blob["state"],
        "modes": blob["modes"],
        "meta": blob.get("meta", {}),
    }


def restore_(gm: fx.GraphModule, restore: dict[str, Any]) -> Records:
    """In place: the saved state into the rebuilt fake-quant model (it must match exactly)."""
    # bias scales are set again by the bias step that follows (per channel only from there on)
    state = {k: v for k, v in restore["state"].items() if not k.endswith("bias_scale")}
    own = {k for k in gm.state_dict() if not k.endswith("bias_scale")}
    problem = sorted(own ^ state.keys())
    if not problem:
        try:
            gm.load_state_dict(state, strict=False)
        except RuntimeError as e:
            problem = [(str(e).splitlines()[1:2] or [str(e)])[0].strip()]
    if problem:
        raise DfqError(
            f"The saved quantized model does not fit this model ({problem[0]}).",
            "load it with the `arch`/`weights` it was saved with",
        )
    for k, mode in restore["modes"].items():
        gm.get_submodule(k).mode = mode
    return {}
