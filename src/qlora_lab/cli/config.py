"""`qlora-lab config CONFIG [--set SECTION.KEY=VALUE ...]`: the config resolved, validated, as YAML."""
from __future__ import annotations

import sys

from .args import add_config, add_set, load


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="print a config after overrides and validation",
                       description="Validate a config and print it resolved.")
    add_config(p)
    add_set(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import to_yaml

    sys.stdout.write(to_yaml(load(args)))
    return 0
