"""What a runtime profile decides, with the generic answers.

A profile turns `QuantConfig.target` into the choices an int8 runtime makes: the concrete grids
and rounding (`resolve`), per-layer weight bits, where activations are quantized and who reads
the quantized value, how biases are stored, and which layers the simulation must compute
integer-exactly. The pipeline asks the profile; nothing below the pipeline knows profiles exist,
so a new runtime is one new module in this package.
"""

from __future__ import annotations

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
            require(module, f"--target {self.name} export / --backend {self.name}")
