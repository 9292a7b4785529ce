"""The `dfq` command. `dfq cls` quantizes a classifier without data and evaluates it; `seg` and
`det` do the same for DeepLab-v3+ and SSD-Lite on VOC; `export` writes int8 models.

This package alone reads argparse Namespaces (nothing in dfq imports it): dfq.cli.parser
declares the switches, dfq.cli.options turns them into library objects, dfq.cli.commands calls
the library. Errors a user can fix print one line and exit 2 (a traceback only with --debug).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings

from dfq.cli.options import as_flags, field_flags
from dfq.cli.parser import build_parser
from dfq.errors import DfqError
from dfq.utils.distributed import process_group, resolve_device
from dfq.utils.malloc import keep_freed_memory

log = logging.getLogger("dfq")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="dfq: %(message)s")
    log.setLevel(logging.INFO)  # dfq's own notes; other libraries (onnxscript...) only warnings
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    flags = field_flags(parser)
    try:
        from dfq.cli import commands

        run = {
            "cls": commands.run_task,
            "seg": commands.run_task,
            "det": commands.run_task,
            "export": commands.export,
            "archs": commands.archs,
        }[args.command]
        with contextlib.ExitStack() as stack:
            stack.enter_context(_messages_in_flags(flags))
            if hasattr(args, "device"):
                args.device = resolve_device(args.device)
                rank, _ = stack.enter_context(process_group(args.device))
                if rank != 0:  # torchrun: only rank 0 prints and writes
                    args.quiet, args.json = True, None
                    devnull = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(devnull))
            result = run(args)
    except DfqError as exc:
        if args.debug:
            raise
        print(f"dfq: error: {as_flags(str(exc), flags)}", file=sys.stderr)
        return 2
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


@contextlib.contextmanager
def _messages_in_flags(flags: dict[str, str]):
    """The library's warnings and log lines name config fields; the command's user reads the
    flags instead (as in its errors)."""

    class InFlags(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args = as_flags(record.getMessage(), flags), None
            return True

    show, handlers, in_flags = warnings.showwarning, list(logging.getLogger().handlers), InFlags()

    def shown(message, *rest, **kw):
        return show(as_flags(str(message), flags), *rest, **kw)

    warnings.showwarning = shown
    for h in handlers:
        h.addFilter(in_flags)
    try:
        yield
    finally:
        warnings.showwarning = show
        for h in handlers:
            h.removeFilter(in_flags)


__all__ = ["build_parser", "main"]
