"""`qlora-lab <verb>`: thin wrappers over the package. Heavy modules are imported inside each verb.

Errors a user can fix (UserError) print one line and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

# Verbs that load models: library warnings go to a log file (train.log, ...), not the console.
QUIET_LIBRARIES = {"train", "generate", "compare", "demo"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=20 (repeatable)")


def _load(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


# ----------------------------------------------------------------------------- verbs

def cmd_train(args) -> int:
    cfg = _load(args)
    from . import training

    run_dir = training.main(cfg, output_dir=args.output_dir, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def cmd_make_model(args) -> int:
    from .presets import make_model

    out = make_model(args.preset, args.out_dir, seed=args.seed)
    print(f"wrote random-init {args.preset} checkpoint to {out}")
    return 0


def cmd_config(args) -> int:
    from .config import to_yaml

    sys.stdout.write(to_yaml(_load(args)))
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line (what, and where to read more), like every other input error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .presets import PRESETS

    parser = _Parser(
        prog="qlora-lab", description="QLoRA vs LoRA fine-tuning of 7B models: data, train, study, generate, compare, "
                                      "plot, bench, merge, export-gguf.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    p = sub.add_parser("train", help="fine-tune a model with the config's method (QLoRA or LoRA)",
                       description="Fine-tune with a config; writes a run folder (config, metrics.jsonl, adapter, checkpoints).")
    _config_args(p)
    p.add_argument("--output-dir", default=None, help="run folder (default: train.output_dir/run_name)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a preset shape to a folder",
                       description="Write a random-init model (a real architecture: the 7B presets in their "
                                   "published shape, the tiny ones with a few small layers; random weights) with a "
                                   "byte-level tokenizer, loadable with from_pretrained.")
    p.add_argument("preset", choices=PRESETS, help="model shape: the real 7B shapes or their tiny CPU twins")
    p.add_argument("out_dir", help="folder to write (config.json, safetensors weights, tokenizer); "
                                   "left as it is if it already holds a random-init model")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights: the same seed gives the same model (default: %(default)s)")
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("config", help="print a config after overrides and validation",
                       description="Validate a config and print it resolved.")
    _config_args(p)
    p.set_defaults(func=cmd_config)

    from .data.cli import add_parser as add_data_parser

    add_data_parser(sub)
    from .studies import add_parser as add_study_parser

    add_study_parser(sub)
    for name in ("generate", "compare", "plot", "bench", "demo", "merge", "export_gguf"):
        _try_add(sub, name)
    return parser


def _try_add(sub, name: str) -> None:
    """Verbs whose modules add their own parser (`add_parser(subparsers)`), when present."""
    import importlib

    try:
        mod = importlib.import_module(f".cli_{name}", __package__)
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith(f"cli_{name}"):
            return
        raise
    mod.add_parser(sub)


def main(argv=None) -> int:
    from . import console
    from .errors import UserError

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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
