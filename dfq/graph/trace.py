"""Tracing a user's model into the fx GraphModule that every pass works on."""

from __future__ import annotations

import copy
import logging
import traceback

import torch
from torch import fx, nn

from dfq.errors import DfqError

log = logging.getLogger("dfq")


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: the construct fx could not trace."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "/torch/" not in f.filename and "/dfq/" not in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a copy of `model` (in eval mode); the user's model is untouched."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        gm.eval()
        return gm
    if not isinstance(model, nn.Module):
        raise DfqError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    if model.training:
        log.warning(
            "%s is in training mode: dfq quantizes an eval-mode copy (BN running statistics, "
            "no dropout) and leaves the model itself as it is",
            type(model).__name__,
        )
    model = copy.deepcopy(model).eval()
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DfqError(
            f"torch.fx cannot trace {type(model).__name__}{_user_frame(exc)}: {msg}",
            "make the forward free of data-dependent control flow there, or wrap that part in a "
            "function marked with torch.fx.wrap / a leaf module, then quantize again.",
        ) from exc
    gm.eval()
    return gm


def check_finite(gm: fx.GraphModule) -> None:
    """Refuse NaN/Inf parameters and buffers up front, naming the tensor."""
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DfqError(
                f"{name} has {bad} NaN/Inf value(s).",
                "check the checkpoint: the model is not usable as it is.",
            )
