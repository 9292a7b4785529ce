"""Int8 runtimes and their profiles: make the simulation compute what the runtime will compute.

`QuantConfig.target` names a profile; the pipeline resolves it into concrete grids, rounding and
quantization points before it quantizes anything, so the fake-quant model *is* the integer model
the runtime's exporter writes. The profiles:

generic  what the config says (defaults: int8 symmetric weights, uint8 activations, int32 bias);
         no runtime behind it (dfq/runtimes/base.py).
<name>   each package dfq/runtimes/<name>/ with a module-level `RUNTIME` (a base.Runtime: its
         profile, exporter and runner), found here by pkgutil: ort (onnxruntime QDQ), ncnn.

Adding a runtime is adding its package (and its pyproject extra); nothing here names one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import time
from pathlib import Path
from typing import Any

from torch import nn

from dfq.config import QuantConfig
from dfq.errors import DfqError
from dfq.runtimes.base import Profile, Runtime

GENERIC = Profile()


@functools.cache
def _runtimes() -> dict[str, Runtime]:
    """name -> RUNTIME of every sub-package of dfq.runtimes that has one (by package name)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.ispkg:
            continue
        runtime = getattr(importlib.import_module(f"{__name__}.{info.name}"), "RUNTIME", None)
        if runtime is not None:
            found[runtime.name] = runtime
    return found


def runtimes() -> list[Runtime]:
    """Every registered runtime."""
    return list(_runtimes().values())


def names() -> list[str]:
    """The `--target` names: generic, then each runtime's."""
    return [GENERIC.name, *_runtimes()]


def backends() -> list[str]:
    """The `--backend` names besides torch: the runtimes'."""
    return list(_runtimes())


def formats() -> list[str]:
    """The `dfq export --format` names: each runtime's file format."""
    return [r.format for r in _runtimes().values()]


def profile(name: str) -> Profile:
    """The profile `--target name` computes with."""
    if name == GENERIC.name:
        return GENERIC
    if name not in _runtimes():
        raise DfqError(f"`target`={name!r} is unknown.", f"use one of {', '.join(names())}")
    return _runtimes()[name]


def by_format(fmt: str) -> Runtime:
    """The runtime that reads files of format `fmt` (onnx -> ort, ncnn -> ncnn)."""
    for r in _runtimes().values():
        if r.format == fmt:
            return r
    raise DfqError(f"`format`={fmt!r} is unknown.", f"use one of {', '.join(formats())}")


def resolve(q: QuantConfig) -> QuantConfig:
    """The concrete QuantConfig `q.target` computes with (idempotent; generic is unchanged)."""
    return profile(q.target).resolve(q)


def export(result, out: str | Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """Write `result.model` (a dfq.pipeline.QuantizationResult) in the format of the runtime it
    was quantized for; returns what was written (and `export_s`, the seconds it took)."""
    runtime = profile(result.config.quant.target)
    if not isinstance(runtime, Runtime):
        raise DfqError(
            "the model was quantized with `target`=generic, which no runtime runs exactly.",
            "quantize with `target`=" + " or `target`=".join(backends()),
        )
    runtime.check_runtime()
    t = time.perf_counter()
    files = runtime.export(result.model, Path(out), shape)
    files["export_s"] = round(time.perf_counter() - t, 2)
    return files


def runner(
    name: str,
    files: dict[str, Any],
    threads: int | None = None,
    workdir: str | Path | None = None,
) -> nn.Module:
    """`--backend name` on what `export` wrote, as a torch module (tensors in, tensors out);
    `workdir`: where the runtime may leave what `Runtime.run_details` reads."""
    runtime = profile(name)
    if not isinstance(runtime, Runtime):
        raise DfqError(
            f"`backend`={name} is unknown.", f"use one of torch, {', '.join(backends())}"
        )
    return runtime.runner(files, threads, Path(workdir) if workdir else None)
