"""What a runtime profile decides, with the generic answers, and what a runtime package provides.

A profile turns `QuantConfig.target` into the choices an int8 runtime makes: the concrete grids
and rounding (`resolve`), per-layer weight bits, where activations are quantized and who reads
the quantized value, how biases are stored, and which layers the simulation must compute
integer-exactly. The pipeline asks the profile; nothing below the pipeline knows profiles exist.

A `Runtime` is a profile with a runtime behind it: the format its files are in, the pyproject
extra that installs it, its exporter (`export`) and its runner (`runner`). Each lives in a
package of its own, dfq/runtimes/<name>/, whose `RUNTIME` the registry (dfq/runtimes/__init__.py)
finds: a new runtime is one new package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx, nn

from dfq.config import QuantConfig
from dfq.quant.activations import default_quantization_points, quantize_biases_
from dfq.records import Records
from dfq.utils.deps import require


class Profile:
    """The generic profile: exactly what the QuantConfig says, no runtime behind it."""

    name = "generic"
    format: str | None = None  # the file format its runtime reads (`dfq export --format`)
    runtime_modules: tuple[str, ...] = ()  # Python modules its exporter and runtime need
    extra: str | None = None  # the pyproject extra that installs them (`pip install "dfq[extra]"`)
    reciprocal_scales = False  # quantizers multiply by float32 1/scale (ncnn)
    int32_bias_at_input_scale = True  # --bits_bias 32 puts biases on s_weight * s_input

    def resolve(self, q: QuantConfig) -> QuantConfig:
        """The concrete config this runtime computes with (idempotent)."""
        return q

    def weight_bits(self, q: QuantConfig, module: nn.Module) -> int:
        return q.bits_weight

    def quantization_points(self, gm: fx.GraphModule) -> list[fx.Node]:
        return default_quantization_points(gm)

    def reads_quantized(self, gm: fx.GraphModule, user: fx.Node) -> bool:
        """Whether `user` reads the quantized value of a quantization point (else the float one)."""
        return True

    def quantize_biases_(self, gm: fx.GraphModule, q: QuantConfig) -> Records:
        return quantize_biases_(gm, q)

    def make_exact_(self, gm: fx.GraphModule) -> dict[str, str]:
        """In place: layers whose arithmetic must follow the runtime's bit for bit; {layer: how}."""
        return {}

    def describe(self, q: QuantConfig) -> dict[str, Any]:
        return {"target": self.name}

    def check_runtime(self) -> None:
        """A one-line DfqError naming the extra to install when the runtime is missing."""
        for module in self.runtime_modules:
            require(module, f"--target {self.name} export / --backend {self.name}", self.extra)


class Runtime(Profile):
    """A profile with an int8 runtime behind it: `dfq export --format <format>` writes its files,
    `--backend <name>` runs them. A package dfq/runtimes/<name>/ exposes one as `RUNTIME`."""

    name: str
    format: str
    extra: str

    def export(self, model: fx.GraphModule, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
        """Write the fake-quant `model` (quantized with this profile) to `out` (a path, its
        suffix the runtime's own or none), for inputs of `shape`; what was written (JSON-able:
        paths as strings, counts)."""
        raise NotImplementedError

    def runner(
        self, files: dict[str, Any], threads: int | None = None, workdir: Path | None = None
    ) -> nn.Module:
        """The runtime on what `export` wrote (`files`), as a torch module: tensors in, tensors
        out. `workdir`: where the runtime may leave what `run_details` reads."""
        raise NotImplementedError

    def run_details(self, files: dict[str, Any], workdir: Path | None) -> dict[str, Any]:
        """What a runner built in `workdir` tells about the run (e.g. the integer kernels)."""
        return {}
