"""Coverage: how much of a model the pipeline actually folded, quantized, ranged and equalized.

A run that silently leaves half its activations in float is not W8A8. Coverage counts, over the
whole graph: BatchNorms folded of all BatchNorms (modules and functional calls); conv/linear
layers quantized of all layers (modules and functional calls, every dimension); activation
quantizers with a range of all quantization points (an unquantized input of a quantized layer
counts as a missing quantizer); layers equalized of all layers. Whatever is not covered is
named per node, with the reason, in `gaps`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx

from dfq.config import PipelineConfig
from dfq.errors import DfqError
from dfq.graph.ops import describe, layer_op, weighted_module
from dfq.quant.activations import input_quantizer_node, quantizer_nodes
from dfq.quant.modules import QuantizedLayer
from dfq.records import LayerRecord, Records

# the figures --strict requires to be complete (equalization is an optimisation, and a network's
# last layer can never be equalized: it is reported, never enforced)
STRICT = (
    ("bn", "bn_folded", "bn_total"),
    ("quantized", "layers_quantized", "layers_total"),
    ("ranged", "activations_ranged", "activation_quantizers_total"),
)


def _layer_name(gm: fx.GraphModule, node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _layers(gm: fx.GraphModule) -> dict[str, str]:
    """Every conv/linear of `gm`: name -> what it is."""
    return {_layer_name(gm, n): op for n in gm.graph.nodes if (op := layer_op(gm, n)) is not None}


def _not_quantizable(node: fx.Node, op: str) -> str:
    if node.op == "call_function":
        return (
            f"{op} (weights given to a function, not a module): not quantized; make it an "
            "nn.Conv2d / nn.Linear module"
        )
    return f"{op} is not supported: dfq quantizes Conv2d and Linear layers"


def coverage(
    tracer: str,
    float_gm: fx.GraphModule,
    model: fx.GraphModule | None,
    layers: Records,
    activations: Records,
    config: PipelineConfig,
) -> dict[str, Any]:
    """The coverage figures and gaps of one run: `tracer` made the graph, `float_gm` is the
    transformed float graph,
    `model` the fake-quant one (None without quantization), `layers` / `activations` the
    pipeline's per-node notes."""
    gaps: dict[str, dict[str, str]] = {"bn": {}, "quantized": {}, "ranged": {}, "equalized": {}}
    # a folded BN is noted on its layer(s) (several for a BN after a concatenation of convs)
    folded = {v.bn_folded for v in layers.values() if isinstance(v.bn_folded, str)}
    for name, v in layers.items():
        if v.bn_folded is False:
            gaps["bn"][name] = v.note if v.is_set("note") else "not folded"
    all_layers = _layers(float_gm)
    nodes = {_layer_name(float_gm, n): n for n in float_gm.graph.nodes}
    for name, op in all_layers.items():
        rec = layers.get(name) or LayerRecord()
        if rec.equalized:
            continue
        if not config.equalize:
            gaps["equalized"][name] = "equalization off (--equalize)"
        elif weighted_module(float_gm, nodes[name]) is None:
            gaps["equalized"][name] = f"{op}: dfq equalizes Conv2d and Linear modules only"
        else:
            gaps["equalized"][name] = (
                rec.equalize_note if rec.is_set("equalize_note") else "not equalized"
            )
    out: dict[str, Any] = {
        "tracer": tracer,
        "bn_folded": len(folded),
        "bn_total": len(folded) + len(gaps["bn"]),
        "layers_quantized": None,
        "layers_total": len(all_layers),
        "activations_ranged": None,
        "activation_quantizers_total": None,
        "layers_equalized": len(all_layers) - len(gaps["equalized"]),
    }
    if model is not None:
        quantized = {
            n.target
            for n in model.graph.nodes
            if isinstance(weighted_module(model, n), QuantizedLayer)
        }
        for name, op in all_layers.items():
            if name not in quantized:
                gaps["quantized"][name] = _not_quantizable(nodes[name], op)
        points = quantizer_nodes(model)
        for src, q in points.items():
            if not model.get_submodule(q.target).quantizing:
                act = activations.get(src) or LayerRecord()
                gaps["ranged"][src] = act.note if act.is_set("note") else "no range: kept in float"
        missing = {}
        for n in model.graph.nodes:
            if (
                isinstance(weighted_module(model, n), QuantizedLayer)
                and input_quantizer_node(model, n) is None
            ):
                src = n.args[0]
                missing.setdefault(
                    src.name,
                    f"input of {n.target} is not quantized (it comes from "
                    f"{describe(model, src)}, which has no quantization point)",
                )
        gaps["ranged"].update(missing)
        total = len(points) + len(missing)
        out["bits"] = _widths(model, quantized, points)
        out.update(
            layers_quantized=len(all_layers) - len(gaps["quantized"]),
            activations_ranged=total - len(gaps["ranged"]),
            activation_quantizers_total=total,
        )
    out["gaps"] = {k: v for k, v in gaps.items() if v}
    return out


def _widths(
    model: fx.GraphModule, quantized: set[str], points: dict[str, fx.Node]
) -> dict[str, dict[str, int]]:
    """How many quantized layers' weights and how many activation quantizers are at each bit
    width, so that a "W6A6" whose input or first/last layers differ says so."""
    weights = Counter(model.get_submodule(name).weight_grid.bits for name in quantized)
    acts = Counter(
        aq.grid.bits for q in points.values() if (aq := model.get_submodule(q.target)).quantizing
    )
    return {
        kind: {str(b): c[b] for b in sorted(c)}
        for kind, c in (("weights", weights), ("activations", acts))
    }


def summary(cov: dict[str, Any]) -> str:
    """One line: `coverage: BN folded 52/52, layers quantized 53/53, activations ranged 64/64,
    layers equalized 37/53; weights 53 at 6 bits; activations 63 at 6 bits, 1 at 8 bits`."""

    def frac(a: str, b: str) -> str:
        return "-" if cov.get(a) is None else f"{cov[a]}/{cov[b]}"

    return (
        f"coverage: BN folded {frac('bn_folded', 'bn_total')}, layers quantized "
        f"{frac('layers_quantized', 'layers_total')}, activations ranged "
        f"{frac('activations_ranged', 'activation_quantizers_total')}, layers equalized "
        f"{frac('layers_equalized', 'layers_total')}"
        + "".join(
            f"; {kind} " + ", ".join(f"{n} at {b} bits" for b, n in widths.items())
            for kind, widths in cov.get("bits", {}).items()
            if widths
        )
    )


def check_strict(cov: dict[str, Any]) -> None:
    """--strict: a DfqError naming every node that is not folded, quantized or ranged."""
    parts = []
    for gap, done, total in STRICT:
        missing = cov["gaps"].get(gap, {})
        if missing:
            named = "; ".join(f"{k}: {v}" for k, v in list(missing.items())[:8])
            more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
            parts.append(f"{done} {cov[done]}/{cov[total]} ({named}{more})")
    if parts:
        raise DfqError(
            "`strict`: incomplete coverage: " + " | ".join(parts) + ".",
            "fix the named nodes, add `distill_range` for ranges the statistics cannot "
            "give, or drop `strict` to accept the float parts",
        )
