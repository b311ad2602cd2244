"""`qlora-lab demo`: QLoRA vs LoRA on the tiny Llama, offline, on a CPU, in a few minutes."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="train the tiny Llama with QLoRA and with LoRA on a shipped set, compare, plot (CPU, offline)",
        description="Fine-tune the tiny random-weight Llama with QLoRA and with LoRA on 24 shipped LIMA-format "
                    "question/answer pairs; write the loss curves, the base vs QLoRA vs LoRA table and the run "
                    "folders under one folder; print how many shipped answers each model reproduces exactly.")
    p.add_argument("-o", "--output-dir", default="qlora-lab-demo",
                   help="output folder (default: %(default)s; an earlier demo's folder is replaced)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the demo's 240)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from ..demo import METHODS, THRESHOLD, run_demo
    from ..errors import UserError

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    if args.no_progress:
        os.environ.setdefault("TQDM_DISABLE", "1")
    r = run_demo(args.output_dir, steps=args.steps, progress=not args.no_progress)
    n = r.n_pairs
    print(f"\nqlora-lab demo finished in {r.seconds:.0f} s. Output folder: {r.out_dir}")
    for name in ("loss.png", "loss.svg", "table.md", "table.html", "summary.json", "generations.jsonl"):
        print(f"  {name:<18} {r.files[name]}")
    for m in METHODS:
        print(f"  run ({m}){' ' * (12 - len(m))} {r.runs[m]}")
    print(f"Exact reproductions of the {n} shipped answers (greedy): "
          + ", ".join(f"{m}: {r.counts[m]}/{n} ({100 * r.exact[m]:.0f}%)" for m in ("base", *METHODS)))
    if r.learned:
        print(f"Both fine-tunes reproduce >= {THRESHOLD:.0%} of the answers and the base none: they learned.")
        return 0
    print(f"Expected each fine-tune >= {THRESHOLD:.0%} and the base 0%: not met (try --steps with more).")
    return 1
