"""The arguments several verbs share: a config file and its `--set SECTION.KEY=VALUE` overrides."""
from __future__ import annotations

import argparse


def add_set(p: argparse.ArgumentParser, help: str = "override a config key, e.g. --set train.max_steps=20 (repeatable)",
            metavar: str = "SECTION.KEY=VALUE") -> None:
    """`--set SECTION.KEY=VALUE`, repeatable, into args.overrides (applied by config.load_config / Config.set)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar, help=help)


def add_config(p: argparse.ArgumentParser, help: str = "YAML config (see configs/)", option: bool = False,
               required: bool = True) -> None:
    """The config file: a positional argument, or with option=True `--config` (args.config either way)."""
    if option:
        p.add_argument("--config", required=required, default=None, help=help)
    else:
        p.add_argument("config", help=help)


def load(args):
    """The config args.config names, with args.overrides applied and validated."""
    from ..config import load_config

    return load_config(args.config, args.overrides)
