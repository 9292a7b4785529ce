"""One flag style: every option is spelled snake_case (kebab-case spellings stay as aliases), and
library messages name config fields, which the CLI shows as the flags that set them."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from dfq.cli import main
from dfq.cli.options import as_flags, field_flags
from dfq.cli.parser import build_parser
from dfq.config import PipelineConfig
from dfq.errors import DfqError

DFQ = Path(__file__).resolve().parents[1] / "dfq"
# config fields only the Python API sets: their messages keep the field's name
API_ONLY = {"rounding", "reconstruction.warmup"}


def _parsers(parser: argparse.ArgumentParser):
    yield "dfq", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub


def _long_options():
    for command, parser in _parsers(build_parser()):
        for action in parser._actions:
            longs = [s for s in action.option_strings if s.startswith("--")]
            if longs and action.dest != "help":
                yield command, action, longs


def test_every_option_is_spelled_snake_case_first_and_kebab_only_as_its_alias():
    for command, action, longs in _long_options():
        assert "-" not in longs[0][2:], f"dfq {command}: {longs[0]} is not snake_case"
        for spelling in longs:
            if "-" in spelling[2:]:
                twin = "--" + spelling[2:].replace("-", "_")
                assert twin in longs, f"dfq {command}: {spelling} has no snake_case twin {twin}"


def test_kebab_aliases_parse_to_the_same_values():
    p = build_parser()
    base = ["cls", "--arch", "resnet18", "--data", "x"]
    kebab = p.parse_args(
        [*base, "--reconstruct-iters", "7", "--batch-size", "3", "--no-absorption"]
    )
    snake = p.parse_args(
        [*base, "--reconstruct_iters", "7", "--batch_size", "3", "--no_absorption"]
    )
    assert vars(kebab) == vars(snake)
    assert (snake.reconstruct_iters, snake.batch_size, snake.absorption) == (7, 3, False)
    assert p.parse_args([*base, "--absorption"]).absorption is True
    assert p.parse_args([*base, "--no-reduce_range"]).reduce_range is False


def _message_literals():
    """(file, line, text) of every string in a DfqError(...) or warning call outside dfq/cli."""
    for path in DFQ.rglob("*.py"):
        if "cli" in path.relative_to(DFQ).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            name = getattr(func, "id", getattr(func, "attr", None))
            if isinstance(node, ast.Call) and name in ("DfqError", "warn", "warning"):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        yield path.relative_to(DFQ.parent), sub.lineno, sub.value


def test_library_messages_name_config_fields_not_flags():
    flagged = [f"{f}:{n}: {t!r}" for f, n, t in _message_literals() if re.search(r"--[a-z]", t)]
    assert not flagged, "name the config field in backticks instead:\n" + "\n".join(flagged)


def test_every_field_a_library_message_names_has_a_flag():
    flags = field_flags(build_parser())
    missing = {
        (name, str(f))
        for f, _, text in _message_literals()
        for name in re.findall(r"`([A-Za-z_][\w.]*)`", text)
        if name not in flags and name not in API_ONLY
    }
    assert not missing, f"add these fields to dfq.cli.options._FIELD_FLAGS: {sorted(missing)}"
    for flag in flags.values():  # and each flag it maps to exists
        assert any(flag in longs for _, _, longs in _long_options()), flag


def test_the_library_names_the_field_and_the_cli_the_flag(capsys):
    with pytest.raises(DfqError, match=r"`clip_weight`=-1.0 must be positive"):
        PipelineConfig(clip_weight=-1.0)
    assert main(["cls", "--arch", "resnet18", "--data", "x", "--clip_weight", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--clip_weight -1.0 must be positive" in err and "`" not in err
    flags = field_flags(build_parser())
    assert as_flags("`reconstruction.iterations`=0; see `dfq archs`", flags) == (
        "--reconstruct_iters 0; see `dfq archs`"
    )
