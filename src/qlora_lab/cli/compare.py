"""`qlora-lab compare RUN... --prompts PROMPTS -o OUT_DIR`: side-by-side answers and run summaries."""
from __future__ import annotations

from .args import add_config, add_set


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="side-by-side table of answers (base vs each run) and run summaries",
        description="Answer a prompt set with the runs' base model and each run (or reuse --generations), "
                    "then write OUT_DIR/table.md, table.html, summary.json, generations.jsonl, metrics/ "
                    "(and compare.log when the libraries warned about something).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `qlora-lab train`")
    p.add_argument("--prompts", default=None,
                   help="prompt set: packaged name or YAML file; default: the first run's generation.prompts")
    p.add_argument("-o", "--output-dir", default="comparison", help="folder for the tables (default: %(default)s)")
    p.add_argument("--generations", default=None,
                   help="reuse answers from this JSONL (from `qlora-lab generate`) instead of generating")
    p.add_argument("--no-base", action="store_true", help="leave out the base-model column")
    p.add_argument("--title", default=None, help="table title (default: the run names)")
    add_config(p, option=True, required=False, help="config YAML whose generation section to use")
    add_set(p, metavar="generation.KEY=VALUE", help="override a generation key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from .. import report, studies
    from ..errors import UserError
    from ..fileio import check_output_folder

    out = check_output_folder(Path(args.output_dir))  # fails fast, before any model loads
    runs = report.read_runs(args.runs)
    prompts = args.prompts
    if args.generations:
        generations = report.read_jsonl(args.generations)
    else:
        from .. import console, generate
        from ..config import load_config

        config = load_config(args.config) if args.config else None
        targets = generate.targets_for([r.path for r in runs], include_base=not args.no_base, config=config)
        gen = generate.generation_config(targets, config, args.overrides)
        prompts = prompts or gen.prompts
        if not prompts:
            raise UserError("no prompt set: give --prompts or set generation.prompts in the run's config")
        with console.log_file(out / "compare.log"):
            generations = generate.run(targets, prompts, gen, progress=not args.no_progress)
    title = args.title or " vs ".join(r.name for r in runs)
    written = studies.write_study(out, runs, generations, prompts=prompts, title=title)
    for name in ("table.md", "table.html", "summary.json", "generations.jsonl"):
        if name in written:
            print(f"{name}: {written[name]}")
    return 0
