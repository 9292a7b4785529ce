"""Facts about this CPU and the int8 rules every runtime profile shares."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

from dfq.config import QuantConfig
from dfq.errors import DfqError


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def require_int8(q: QuantConfig) -> None:
    """Runtimes compute int8 activations and symmetric int8 weights; fewer bits live in those
    containers (weights on a coarser grid, activations clipped to their levels). That holds for
    every width the config asks for: the model-wide ones, the input's, keep_first_last's and
    each layer_bits rule's."""
    if q.bits_activation > 8 or q.bits_weight > 8:
        raise DfqError(
            f"`target`={q.target} runs int8: W{q.bits_weight}A{q.bits_activation} "
            "cannot be exported.",
            "use `bits_weight` <= 8 and `bits_activation` <= 8, or `target`=generic",
        )
    if q.network_input_bits > 8:
        raise DfqError(
            f"`target`={q.target} runs int8: an input of {q.network_input_bits} bits "
            "cannot be exported.",
            "use `input_bits`=8 or fewer, or `target`=generic",
        )
    if q.keep_first_last is not None and q.keep_first_last > 8:
        raise DfqError(
            f"`keep_first_last`={q.keep_first_last} (the first and last layers' bits): "
            f"the {q.target} target runs int8 only.",
            "use `keep_first_last`=8 or fewer, or `target`=generic",
        )
    for pattern, w, a in q.layer_bits:
        if w > 8 or (a is not None and a > 8):
            raise DfqError(
                f"`layer_bits` {pattern}={w}{'' if a is None else f',{a}'}: "
                f"the {q.target} target runs int8 only.",
                "use `layer_bits` widths of 8 or fewer, or `target`=generic",
            )
    if not q.weight_symmetric:
        raise DfqError(
            f"`target`={q.target} uses symmetric int8 weights.",
            "drop asymmetric weights (`weight_symmetric`)",
        )


def qdq_grids(q: QuantConfig, target: str, reduce: bool) -> QuantConfig:
    """The QDQ runtimes' grids (onnxruntime, OpenVINO): int8 widths, uint8 asymmetric
    activations, int32 bias at s_in * s_w, half-to-even; 7-bit weights when `reduce`."""
    require_int8(q)
    if q.bits_bias != 32:
        raise DfqError(f"`target`={target} adds an int32 bias at s_in * s_w.", "use `bits_bias`=32")
    return dataclasses.replace(
        q,
        activation_symmetric=False,
        rounding="half_even",
        reduce_range=reduce,
        bits_weight=min(q.bits_weight, 7) if reduce else q.bits_weight,
    )
