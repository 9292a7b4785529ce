"""ExecuTorch's Python runtime on dfq's batches: a .pte program (XNNPACK-delegated) as a torch
module, so every task's `evaluate` scores it unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from dfq.utils.deps import require

EXTRA = "xnnpack"  # the pyproject extra that installs executorch (and the torchao it needs)


class XnnpackRunner(torch.nn.Module):
    def __init__(self, path: str | Path):
        super().__init__()
        require("executorch", "the ExecuTorch runtime", EXTRA)
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """One image at a time (the program is exported for batch 1), outputs concatenated."""
        x = x.detach().cpu().float()
        per_image = [[o.clone() for o in self.method.execute([xi[None].contiguous()])] for xi in x]
        outs = [torch.cat(parts) for parts in zip(*per_image)]
        return outs[0] if len(outs) == 1 else tuple(outs)
