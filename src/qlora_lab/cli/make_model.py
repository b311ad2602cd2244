"""`qlora-lab make-model PRESET OUT_DIR [--seed N]`: a random-weight checkpoint of a preset shape."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..presets import PRESETS

    p = sub.add_parser("make-model", help="write a random-weight checkpoint of a preset shape to a folder",
                       description="Write a random-init model (a real architecture: the 7B presets in their "
                                   "published shape, the tiny ones with a few small layers; random weights) with a "
                                   "byte-level tokenizer, loadable with from_pretrained.")
    p.add_argument("preset", choices=PRESETS, help="model shape: the real 7B shapes or their tiny CPU twins")
    p.add_argument("out_dir", help="folder to write (config.json, safetensors weights, tokenizer); "
                                   "left as it is if it already holds a random-init model")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights: the same seed gives the same model (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..presets import make_model

    out = make_model(args.preset, args.out_dir, seed=args.seed)
    print(f"wrote random-init {args.preset} checkpoint to {out}")
    return 0
