"""Runtime profiles: make the simulation compute what an int8 runtime will compute.

`QuantConfig.target` names a profile; the pipeline resolves it into concrete grids, rounding and
quantization points before it quantizes anything, so the fake-quant model *is* the integer model
the exporter writes (dfq/export/). One module per runtime:

generic  what the config says (defaults: int8 symmetric weights, uint8 activations, int32 bias).
ort      onnxruntime QDQ (dfq/targets/ort.py).
ncnn     ncnn int8 (dfq/targets/ncnn.py).
"""

from __future__ import annotations

from dfq.config import TARGETS, QuantConfig
from dfq.errors import DfqError
from dfq.targets.base import Profile
from dfq.targets.ncnn import NCNN
from dfq.targets.ort import ORT

GENERIC = Profile()
PROFILES: dict[str, Profile] = {p.name: p for p in (GENERIC, ORT, NCNN)}
assert tuple(PROFILES) == TARGETS, "dfq.config.TARGETS names the profiles of this package"


def profile(name: str) -> Profile:
    if name not in PROFILES:
        raise DfqError(f"--target '{name}' is unknown.", f"use one of {', '.join(PROFILES)}")
    return PROFILES[name]


def by_format(fmt: str) -> Profile:
    """The profile whose runtime reads files of format `fmt` (onnx -> ort, ncnn -> ncnn)."""
    for p in PROFILES.values():
        if p.format == fmt:
            return p
    raise DfqError(
        f"--format '{fmt}' is unknown.",
        f"use one of {', '.join(p.format for p in PROFILES.values() if p.format)}",
    )


def resolve(q: QuantConfig) -> QuantConfig:
    """The concrete QuantConfig `q.target` computes with (idempotent; generic is unchanged)."""
    return profile(q.target).resolve(q)
