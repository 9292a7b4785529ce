"""ncnn on dfq's batches: a .param/.bin as a torch module (NCHW float in, logits out), so
`dfq.tasks.classification.evaluate` works on it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dfq.errors import DfqError
from dfq.utils.deps import require

EXTRA = "export"  # the pyproject extra that installs ncnn and pnnx


def is_int8_param(param: str | Path) -> bool:
    """Does an ncnn .param carry int8 weights (int8_scale_term 8=N on some layer)?"""
    return any(
        tok.startswith("8=") and tok != "8=0"
        for line in Path(param).read_text().splitlines()[2:]
        for tok in line.split()[4:]
    )


class NcnnRunner(torch.nn.Module):
    """ncnn on the CPU, image by image (ncnn has no batch axis).

    int8 is decided by the model, never by the caller: ncnn aborts when it loads int8 weights
    with use_int8_inference off, so an int8 .param always gets it on. fp16/bf16 storage and
    arithmetic are off, so the float parts compute in fp32 as the simulation does."""

    def __init__(
        self,
        param: str | Path,
        binf: str | Path | None = None,
        threads: int = 1,
        input_name: str = "in0",
        output_names: str | list[str] = "out0",
    ):
        super().__init__()
        ncnn = require("ncnn", "--backend ncnn", EXTRA)
        param = Path(param)
        binf = Path(binf) if binf else param.with_suffix(".bin")
        self.int8 = is_int8_param(param)
        net = ncnn.Net()
        opt = net.opt
        opt.use_int8_inference = self.int8  # must be True before load_model for int8 weights
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = False
        opt.num_threads = threads
        if net.load_param(str(param)) != 0 or net.load_model(str(binf)) != 0:
            raise DfqError(f"ncnn could not load {param} / {binf}.")
        self.net, self.input_name, self.threads = net, input_name, threads
        self.output_names = [output_names] if isinstance(output_names, str) else list(output_names)
        self._ncnn = ncnn

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or the tuple of its outputs (e.g. an SSD's scores and boxes)."""
        x = x.detach().cpu().float().contiguous().numpy()
        outs = [[] for _ in self.output_names]
        for img in x:
            # a copy ncnn owns: an in-place first layer (Clip, ReLU) on a Mat that wraps numpy
            # memory crashes ncnn's Python binding
            mat = self._ncnn.Mat(np.ascontiguousarray(img)).clone()
            ex = self.net.create_extractor()
            ex.input(self.input_name, mat)
            for name, per_image in zip(self.output_names, outs):
                ret, out = ex.extract(name)
                if ret != 0:
                    raise DfqError(f"ncnn extract of '{name}' failed ({ret}).")
                per_image.append(np.array(out).copy())  # no batch axis: (w), (h, w) or (c, h, w)
        batched = tuple(torch.from_numpy(np.stack(o)) for o in outs)
        return batched[0] if len(batched) == 1 else batched
