"""`qlora-lab data ...` sub-commands."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (OASST1 best paths, LIMA) and show stats")
    p.set_defaults(func=lambda args: p.print_help() or 2)
