"""Optional dependencies, checked where they are first needed.

A missing extra is a user error like any other: one line naming the package and the
`pip install "dfq[extra]"` that brings it, exit status 2 from the CLI, never a raw
ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dfq.errors import DfqError

# importable module -> the extra of pyproject.toml that installs it (a runtime's modules: the
# runtime names its extra itself, dfq/runtimes/<name>/)
EXTRAS = {
    "matplotlib": "plot",
    "google": "tf",
    "timm": "timm",
    "safetensors": "timm",
}
# importable module -> the name pip installs it by, where the two differ
DISTRIBUTIONS = {"google": "protobuf"}


def require(module: str, what: str, extra: str | None = None) -> ModuleType:
    """Import `module` for `what` (e.g. "--backend ort"), or say how to install it: with the
    pyproject `extra` that brings it (default: the one EXTRAS names)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        package = DISTRIBUTIONS.get(top, module)
        extra = extra or EXTRAS.get(top)
        fix = f'pip install "dfq[{extra}]"' if extra else f"pip install {package}"
        raise DfqError(
            f"{what} needs the Python package '{package}', which is not installed.", fix
        ) from exc
