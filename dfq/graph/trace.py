"""Tracing a user's model into the fx GraphModule that every pass works on."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import traceback

import torch
from torch import fx, nn

from dfq.errors import DfqError
from dfq.graph.lift import lift_functional_layers_

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


DEFAULT_INPUT = (3, 224, 224)


def trace(model: nn.Module, input_size: tuple[int, ...] | None = None) -> fx.GraphModule:
    """Symbolically trace a copy of `model` (in eval mode); the user's model is untouched.

    Where symbolic tracing fails on Python control flow over shapes (timm's "same" padding,
    shape checks), the model is traced again with static shapes: fx's meta tracer gives every
    proxy the concrete shape of an `input_size` (C, H, W) input (default 3x224x224), so such code
    runs on numbers; the graph then holds for that input size only, and is checked against the
    model on a batch of 2 before it is used. Functional conv/linear calls on constant weights
    become modules (dfq.graph.lift). `gm.meta["dfq_tracer"]` says which tracer made the graph,
    `gm.meta["dfq_lifted"]` which layers were lifted."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
        gm.eval()
        return _normalised(gm, gm.meta.get("dfq_tracer", "given fx.GraphModule"))
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
        size = tuple(input_size or DEFAULT_INPUT)
        try:
            gm = _static_trace(model, size)
        except Exception as static_exc:
            why = str(static_exc).strip().splitlines()[0] if str(static_exc).strip() else ""
            raise DfqError(
                f"torch.fx cannot trace {type(model).__name__}{_user_frame(exc)}: {msg}; nor with "
                f"static shapes {(1, *size)}: {type(static_exc).__name__}: {why}",
                "make the forward free of data-dependent control flow there, or wrap that part "
                "in a function marked with torch.fx.wrap / a leaf module, then quantize again.",
            ) from exc
        log.info("symbolic tracing failed (%s); traced with static input shape %s", msg, size)
        return _normalised(gm, f"torch.fx meta tracer, static input shape {(1, *size)}")
    gm.eval()
    return _normalised(gm, "torch.fx.symbolic_trace")


def _static_trace(model: nn.Module, size: tuple[int, ...]) -> fx.GraphModule:
    """fx's meta tracer on a meta-device copy (proxies carry concrete shapes), the graph then
    bound to the real parameters and checked against the model on a batch of 2."""
    import inspect
    import warnings

    from torch.fx.experimental import meta_tracer

    params = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise ValueError("forward takes no positional input")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "could not compute metadata" for ops it skips
        graph = meta_tracer.symbolic_trace(
            copy.deepcopy(model).to("meta"),
            meta_args={params[0].name: torch.zeros((1, *size), device="meta")},
        ).graph
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # fx prints its frame
        want, got = model(x), gm(x)
    if not (
        isinstance(got, torch.Tensor)
        and got.shape == want.shape
        and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    ):
        raise ValueError(
            "the static graph does not reproduce the model on a batch of 2 "
            "(its shapes are baked in beyond the input size)"
        )
    return gm


def _normalised(gm: fx.GraphModule, tracer: str) -> fx.GraphModule:
    lifted = lift_functional_layers_(gm)
    gm.meta["dfq_tracer"] = tracer
    gm.meta["dfq_lifted"] = {**gm.meta.get("dfq_lifted", {}), **lifted}
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
