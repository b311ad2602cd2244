"""`qlora-lab train CONFIG [--set SECTION.KEY=VALUE ...] [--output-dir DIR] [--resume]`: one run folder."""
from __future__ import annotations

from .args import add_config, add_set, load


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with the config's method (QLoRA or LoRA)",
                       description="Fine-tune with a config; writes a run folder (config, metrics.jsonl, adapter, checkpoints).")
    add_config(p)
    add_set(p)
    p.add_argument("--output-dir", default=None, help="run folder (default: train.output_dir/run_name)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = load(args)
    from .. import training

    run_dir = training.main(cfg, output_dir=args.output_dir, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0
