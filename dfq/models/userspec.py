"""`--model module.or.file.py:callable`: build a user's own model without editing dfq."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from dfq.errors import DfqError


def load_callable(spec: str) -> Callable:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise DfqError(
            f"`builder`='{spec}' is not of the form module.or.file.py:callable.",
            "e.g. `builder`=my_nets.py:build_net",
        )
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.exists():
                raise DfqError(
                    f"`builder` file {path} does not exist.", "check the path before the colon"
                )
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except DfqError:
        raise
    except Exception as exc:
        raise DfqError(f"`builder`: importing {where} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DfqError(
            f"`builder`: {where} has no callable '{name}'.",
            "name a function that returns the nn.Module",
        )
    return fn
