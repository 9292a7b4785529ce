"""Functional conv/linear calls on constant weights become modules, so every pass sees them.

fx traces through modules that are not torch.nn's own: timm's `Linear` (F.linear on its
parameters), weight-standardized convs (timm's StdConv2d / ScaledStdConv2d: F.batch_norm over
the weight, then F.conv2d) and user code that calls F.conv2d on a parameter. Where the weight
and bias depend on parameters and buffers only (no input), they are evaluated once (in eval
mode they are constants) and the call is replaced by an nn.Conv2d / nn.Linear holding them:
the same function, now folded, equalized and quantized like any layer. A call whose weight
depends on the input, or whose other arguments are not constants, stays as it is (coverage
reports it).
"""

from __future__ import annotations

import inspect
from operator import attrgetter
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

_CONV = {F.conv2d, torch.conv2d}
_LINEAR = {F.linear}
_CONV_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
        for n, d in (
            ("input", inspect.Parameter.empty),
            ("weight", inspect.Parameter.empty),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("dilation", 1),
            ("groups", 1),
        )
    ]
)
_LINEAR_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
        for n, d in (
            ("input", inspect.Parameter.empty),
            ("weight", inspect.Parameter.empty),
            ("bias", None),
        )
    ]
)


class NotConstant(Exception):
    pass


def is_constant(node: Any) -> bool:
    """Whether `node` depends on parameters / buffers / literals only (no input, no module
    call): walks its ancestors without evaluating anything."""
    todo = [node] if isinstance(node, fx.Node) else []
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op not in ("get_attr", "call_function", "call_method"):
            return False
        todo.extend(n.all_input_nodes)
    return True


def constant_value(gm: fx.GraphModule, node: Any, cache: dict | None = None) -> Any:
    """The value of `node` if it depends on parameters / buffers / literals only (else
    NotConstant)."""
    cache = {} if cache is None else cache
    if isinstance(node, fx.Node) and not is_constant(node):
        raise NotConstant(node.name)
    if isinstance(node, (list, tuple)):
        return type(node)(constant_value(gm, n, cache) for n in node)
    if isinstance(node, dict):
        return {k: constant_value(gm, v, cache) for k, v in node.items()}
    if not isinstance(node, fx.Node):
        return node
    if node in cache:
        return cache[node]
    if node.op == "get_attr":
        value = attrgetter(node.target)(gm)
    elif node.op in ("call_function", "call_method"):
        args = constant_value(gm, node.args, cache)
        kwargs = constant_value(gm, node.kwargs, cache)
        fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
        if node.op == "call_method":
            args = args[1:]
        with torch.no_grad():
            value = fn(*args, **kwargs)
    else:  # a placeholder or a module call: depends on the input (or on state)
        raise NotConstant(node.name)
    cache[node] = value.detach() if isinstance(value, torch.Tensor) else value
    return cache[node]


def _owner(node: fx.Node) -> str | None:
    """The module path owning a weight read straight from a parameter (`head.fc.weight`)."""
    while (
        node.op in ("call_method", "call_function")
        and node.args
        and isinstance(node.args[0], fx.Node)
    ):
        node = node.args[0]  # .reshape / .to / batch_norm(weight...) of the parameter
    if node.op == "get_attr" and "." in node.target:
        return node.target.rpartition(".")[0]
    return None


def _module_for(
    node: fx.Node, w: torch.Tensor, b: torch.Tensor | None, args: dict
) -> nn.Module | None:
    if node.target in _LINEAR:
        if w.dim() != 2:
            return None
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    else:
        if w.dim() != 4:
            return None
        groups = args["groups"]
        m = nn.Conv2d(
            w.shape[1] * groups,
            w.shape[0],
            tuple(w.shape[2:]),
            args["stride"],
            args["padding"],
            args["dilation"],
            groups,
            bias=b is not None,
        )
    m = m.to(dtype=w.dtype, device=w.device)
    with torch.no_grad():
        m.weight.copy_(w)
        if b is not None:
            m.bias.copy_(b)
    return m.eval()


def _free_name(gm: fx.GraphModule, base: str) -> str:
    taken = dict(gm.named_modules())
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def lift_functional_layers_(gm: fx.GraphModule) -> dict[str, str]:
    """In place: replace each functional conv2d/linear on constant weights by a module;
    returns {new module name: what it was}."""
    lifted: dict[str, str] = {}
    cache: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CONV | _LINEAR:
            continue
        sig = _LINEAR_SIGNATURE if node.target in _LINEAR else _CONV_SIGNATURE
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.apply_defaults()
        args = bound.arguments
        if any(
            isinstance(v, fx.Node) for k, v in args.items() if k not in ("input", "weight", "bias")
        ):
            continue
        try:
            w = constant_value(gm, args["weight"], cache)
            b = constant_value(gm, args["bias"], cache)
        except NotConstant:
            continue
        if not isinstance(w, torch.Tensor) or not (b is None or isinstance(b, torch.Tensor)):
            continue
        m = _module_for(node, w, b, args)
        if m is None:
            continue
        owner = _owner(args["weight"])
        name = _free_name(gm, (owner or node.name).replace(".", "_") + "_lifted")
        gm.add_submodule(name, m)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (args["input"],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        lifted[name] = (owner, f"{node.target.__name__} call on constant weights")
    if not lifted:
        return {}
    _erase_dead_constants(gm, cache)
    gm.delete_all_unused_submodules()
    out = {}
    for name, (owner, what) in lifted.items():
        if owner is not None and owner not in dict(gm.named_modules()):
            _rename(gm, name, owner)  # the layer keeps its name in reports: `head.fc`
            name = owner
        out[name] = what
    gm.graph.lint()
    gm.recompile()
    return out


def _erase_dead_constants(gm: fx.GraphModule, constants: dict) -> None:
    """Erase the parameter-only nodes that fed the lifted calls and now have no user."""
    changed = True
    while changed:
        changed = False
        for n in reversed(list(gm.graph.nodes)):
            if n in constants and not n.users:
                gm.graph.erase_node(n)
                del constants[n]
                changed = True


def _rename(gm: fx.GraphModule, old: str, new: str) -> None:
    m = gm.get_submodule(old)
    gm.delete_submodule(old)
    gm.add_submodule(new, m)
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == old:
            n.target = new
