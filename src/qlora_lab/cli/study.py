"""`qlora-lab study NAME -o STUDY_DIR [--offline] [--steps N] ...`: one of the two studies (studies.run)."""
from __future__ import annotations

from .args import add_set


def add_parser(sub) -> None:
    from .. import studies

    p = sub.add_parser("study", help="run one of the two studies end to end into a study folder",
                       description=studies.__doc__.split("\n\n")[2])
    p.add_argument("name", choices=sorted(studies.STUDIES), help="which study")
    p.add_argument("-o", "--output", required=True, help="study folder to write (e.g. assets/studies/NAME)")
    p.add_argument("--work-dir", default="runs/studies", help="where run folders (adapters, checkpoints) go")
    p.add_argument("--configs-dir", default="configs", help="folder holding the study's configs")
    p.add_argument("--offline", action="store_true",
                   help="random-weight model of each config's shape + synthetic corpora of the real size (no hub)")
    p.add_argument("--steps", type=int, help="train.max_steps for every arm (default: the configs')")
    p.add_argument("--memory-budget", type=float, help="also train the QLoRA arm under this many GiB (15: a T4)")
    p.add_argument("--budget-steps", type=int, help="steps of the memory-budget run (default: as the others)")
    p.add_argument("--gpus", type=_gpu_list, metavar="I,J,...",
                   help="train the arms (and the memory-budget run) side by side, one per GPU: indices as nvidia-smi "
                        "numbers them (they replace CUDA_VISIBLE_DEVICES), e.g. 0,1")
    add_set(p, help="config override for every arm (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import studies

    studies.run(args.name, args.output, args.work_dir, offline=args.offline, overrides=args.overrides,
                steps=args.steps, budget_gib=args.memory_budget, budget_steps=args.budget_steps,
                configs_dir=args.configs_dir, progress=not args.no_progress, gpus=args.gpus)
    return 0


def _gpu_list(text: str) -> list[int]:
    import argparse

    try:
        gpus = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices separated by commas, e.g. 0,1") from None
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: distinct GPU indices >= 0, e.g. 0,1")
    return gpus
