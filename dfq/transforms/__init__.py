"""Float-preserving (or deliberately approximating) graph transforms of the DFQ pipeline.

Each takes `(gm, stats)` and returns a `Transformed(gm, stats, info)`: a new GraphModule,
the updated statistics, and per-layer notes for the report. Nothing changes in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import fx

from dfq.stats import Stats


class Transformed(NamedTuple):
    gm: fx.GraphModule
    stats: Stats
    info: dict[str, dict[str, Any]]
