"""What a pipeline step hands to the next: the new graph, its statistics, and what it did to
each layer. Below every algorithm, so that quant/ and transforms/ share it without importing
each other."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import fx

from dfq.statistics.bn import Stats


class Transformed(NamedTuple):
    gm: fx.GraphModule
    stats: Stats
    info: dict[str, dict[str, Any]]
