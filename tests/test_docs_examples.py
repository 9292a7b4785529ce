"""The code in the docs runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_block(doc: str, section: str) -> str:
    text = (DOCS / doc).read_text()
    body = text[text.index(section) :]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_the_user_step_of_architecture_md_runs_where_it_says(small_net):
    scope = {"model": small_net}
    exec(_python_block("architecture.md", "## How to add a pipeline step"), scope)
    result = scope["result"]
    order = list(result.timings)
    assert order.index("count_weights") == order.index("fold_bn") + 1
    layers = {
        n: m.weight.numel()
        for n, m in small_net.named_modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }
    counted = {n: r.extra["weights"] for n, r in result.layers.items() if "weights" in r.extra}
    assert counted == layers  # every conv and linear, BNs folded away, with its weight count
