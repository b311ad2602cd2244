"""`qlora-lab generate RUN_OR_MODEL... --prompts PROMPTS -o generations.jsonl`."""
from __future__ import annotations

from .args import add_config, add_set


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="answer a prompt set with a base model, a run's adapter, or several runs",
        description="Answer every prompt of a prompt set with each model given, using one generation "
                    "config (from the first run's config, or --config) and its seed. Writes JSON lines.")
    p.add_argument("targets", nargs="+", metavar="RUN_OR_MODEL",
                   help="run folder (base + adapter), config YAML (its base model), model folder, "
                        "hub id, or random-init preset")
    p.add_argument("--prompts", default=None,
                   help="prompt set: packaged name (oasst1_levels, lima_examples) or YAML file; "
                        "default: the config's generation.prompts")
    p.add_argument("-o", "--output", default="generations.jsonl",
                   help="JSONL to write (default: %(default)s); library warnings, if any, go to the same "
                        "path with suffix .log")
    p.add_argument("--base", action="store_true", help="also answer with the runs' base model (no adapter)")
    add_config(p, option=True, required=False,
               help="config YAML whose generation section (and, for a bare model, quantization) to use")
    add_set(p, metavar="generation.KEY=VALUE", help="override a generation key, e.g. --set generation.seed=1 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from .. import console, generate
    from ..config import load_config
    from ..errors import UserError
    from ..fileio import check_output_file

    check_output_file(args.output)  # before any model loads
    config = load_config(args.config) if args.config else None
    targets = generate.targets_for(args.targets, include_base=args.base, config=config)
    gen = generate.generation_config(targets, config, args.overrides)
    prompts = args.prompts or gen.prompts
    if not prompts:
        raise UserError("no prompt set: give --prompts or set generation.prompts in the config")
    with console.log_file(Path(args.output).with_suffix(".log")):
        rows = generate.run(targets, prompts, gen, out=args.output, progress=not args.no_progress)
    print(f"wrote {len(rows)} answers ({len(targets)} model(s)) to {args.output}")
    return 0
