"""`qlora-lab <verb>`: thin wrappers over the package, one module per verb, listed once in VERBS.

A verb module has `add_parser(subparsers)` (its flags and help) and `run(args)` (parse what is left,
call one library function, print the result). Heavy modules are imported inside `run`, so `--help`
loads no torch. Errors a user can fix (UserError) print one line and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from . import bench, compare, config, data, demo, export_gguf, generate, make_model, merge, plot, study, train

# The verbs, in the order `qlora-lab --help` lists them.
VERBS = (train, make_model, config, data, study, generate, compare, plot, bench, demo, merge, export_gguf)
# Verbs that load models: library warnings go to a log file (train.log, ...), not the console.
QUIET_LIBRARIES = {"train", "generate", "compare", "demo"}


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line (what, and where to read more), like every other input error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(
        prog="qlora-lab", description="QLoRA vs LoRA fine-tuning of 7B models: data, train, study, generate, compare, "
                                      "plot, bench, merge, export-gguf.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv=None) -> int:
    from .. import console
    from ..errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = args.verb in QUIET_LIBRARIES
    try:
        with console.library_output() if quiet else contextlib.nullcontext():
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"qlora-lab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qlora-lab: interrupted", file=sys.stderr)
        return 130
