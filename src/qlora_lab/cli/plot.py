"""`qlora-lab plot RUN... [--wandb ENTITY/PROJECT/RUN_ID ...] -o loss.png`: loss curves, PNG and SVG."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="train and eval loss of one or more runs on one axis (PNG and SVG)",
        description="Overlay the train loss (raw and smoothed) and eval loss of runs, from their "
                    "metrics.jsonl or from a wandb run's full history. Writes OUTPUT.png and OUTPUT.svg.")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders (or metrics JSONL files)")
    p.add_argument("--wandb", action="append", default=[], metavar="ENTITY/PROJECT/RUN_ID",
                   help="also plot a wandb run's history (repeatable; needs network and WANDB_API_KEY)")
    p.add_argument("-o", "--output", default="loss.png", help="image path; .png and .svg are written (default: %(default)s)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="x axis (default: %(default)s)")
    p.add_argument("--smooth", type=float, default=0.6,
                   help="smoothing weight in [0, 1): a point k away counts weight**k, on both sides, so the "
                        "line has no lag and ends at the last loss; 0 = raw only (default: %(default)s)")
    p.add_argument("--no-raw", action="store_true", help="hide the faint raw train curve")
    p.add_argument("--title", default=None, help="figure title (default: the curves' labels joined by 'vs')")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import plots

    curves = plots.load_curves(args.runs, args.wandb)
    fig = plots.loss_figure(curves, x=args.x, smooth=args.smooth, show_raw=not args.no_raw, title=args.title)
    for path in plots.save_figure(fig, args.output):
        print(path)
    return 0
