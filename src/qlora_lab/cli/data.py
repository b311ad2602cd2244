"""`qlora-lab data ...` sub-commands: thin wrappers over data/oasst1.py, lima.py, stats.py and synthetic.py.

    qlora-lab data oasst1 INPUT -o OUT.jsonl [--lang en de ...] [--split train] [--keep-unanswered-prompt]
    qlora-lab data lima INPUT -o OUT.jsonl [--split train]
    qlora-lab data stats FILE.jsonl --config CONFIG [--set data.max_length=1024] [--png FILE.png]
    qlora-lab data synth oasst1|lima -o RAW.jsonl [--split S] [--seed N] [-n ROWS] [--flat]
"""
from __future__ import annotations

import argparse

from .args import add_config, add_set, load


def cmd_oasst1(args) -> int:
    from ..data.oasst1 import prepare_oasst1

    langs = [x for item in (args.lang or []) for x in item.split(",") if x] or None
    counts = prepare_oasst1(args.input, args.output, langs=langs, split=args.split,
                            keep_unanswered_prompt=args.keep_unanswered_prompt)
    print(counts.summary())
    print(f"wrote {args.output}")
    return 0


def cmd_lima(args) -> int:
    from ..data.lima import prepare_lima

    counts = prepare_lima(args.input, args.output, split=args.split)
    print(counts.summary())
    print(f"wrote {args.output}")
    return 0


def cmd_stats(args) -> int:
    from ..data.stats import length_stats, tokenizer_for, write_png

    cfg = load(args)
    st = length_stats(args.file, tokenizer_for(cfg), cfg.data)
    print(st.text(bins=args.bins))
    png = write_png(st, args.png)
    if png:
        print(f"wrote {png}")
    return 0


def cmd_synth(args) -> int:
    import time

    from ..data.synthetic import write

    t0 = time.perf_counter()
    lines = write(args.corpus, args.output, split=args.split, seed=args.seed, n=args.n, flat=args.flat)
    what = "messages" if args.flat else ("trees" if args.corpus == "oasst1" else "rows")
    print(f"synth {args.corpus} {args.split} (seed {args.seed}): {lines} {what} in "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"wrote {args.output}; next: qlora-lab data {args.corpus} {args.output} -o PREPARED.jsonl")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (OASST1 best paths, LIMA) and show stats",
                       description="Prepare conversations (one JSON object per line: id, messages, text) "
                                   "and inspect their token lengths.")
    dsub = p.add_subparsers(dest="data_verb", metavar="COMMAND")
    dsub.required = True

    q = dsub.add_parser(
        "oasst1", help="OASST1 message trees -> the best-ranked conversation of each tree",
        description="One conversation per tree: from the root prompt, follow the best-ranked reply "
                    "(rank 0 first; unranked last; ties: earliest created_date, or the export's order "
                    "where created_date is absent, then smallest message_id). Deleted subtrees and trees "
                    "not ready_for_export are skipped; a path ending on a prompter loses that message "
                    "unless --keep-unanswered-prompt.")
    q.add_argument("input", help="flat message table (.jsonl), nested tree export (.trees.jsonl), "
                                 "either gzipped or not, or the hub id OpenAssistant/oasst1")
    q.add_argument("-o", "--output", required=True, help="prepared JSONL to write (replaced atomically)")
    q.add_argument("--lang", action="extend", nargs="+", metavar="LANG",
                   help="keep trees whose root prompt is in one of these languages (e.g. en es); default all")
    q.add_argument("--split", default="train", help="hub split (train or validation); ignored for files")
    q.add_argument("--keep-unanswered-prompt", action="store_true",
                   help="keep a final prompter message that nothing answers, as the published Guanaco "
                        "subset (timdettmers/openassistant-guanaco) does, to compare with it row for row; "
                        "default: drop it (it trains nothing when only answers carry loss)")
    q.set_defaults(func=cmd_oasst1)

    q = dsub.add_parser("lima", help="LIMA JSONL -> prepared conversations",
                        description="LIMA rows ({conversations: [user, assistant, ...], source}) -> "
                                    "prepared conversations; prompt-only rows (the test file) are kept "
                                    "and marked prompt_only.")
    q.add_argument("input", help="LIMA .jsonl (train or test), gzipped or not, or the hub id GAIR/lima")
    q.add_argument("-o", "--output", required=True, help="prepared JSONL to write (replaced atomically)")
    q.add_argument("--split", default="train", help="hub split (train or test); ignored for files")
    q.set_defaults(func=cmd_lima)

    q = dsub.add_parser("stats", help="counts and token-length histogram of a prepared file",
                        description="Tokenize a prepared file as training would (the config's model "
                                    "tokenizer and data.format) and print counts, length percentiles "
                                    "and a histogram; also write it as a PNG.")
    q.add_argument("file", help="prepared JSONL (output of `data oasst1` or `data lima`)")
    add_config(q, option=True, help="YAML config: its tokenizer, format and max_length are used")
    add_set(q, help="override a config key, e.g. --set data.format=lima_eot")
    q.add_argument("--png", default=None, help="histogram image (default: FILE with suffix .lengths.png)")
    q.add_argument("--bins", type=_positive, default=10, help="histogram rows in the text output")
    q.set_defaults(func=cmd_stats)

    q = dsub.add_parser(
        "synth", help="synthetic raw OASST1 trees or LIMA rows of the real size and lengths (no real data)",
        description="Pseudo-word text in the raw formats, sized like the real splits (OASST1 train 9,846 "
                    "trees / validation 518; LIMA train 1,030 rows incl. 30 multi-turn / test 300 "
                    "prompts), with the real length profile in Llama-2 tokens written as bytes, i.e. "
                    "as tokens of the random-init models' byte tokenizer. For timing and memory "
                    "studies without the hub; see data/synthetic.py for the recipe.")
    q.add_argument("corpus", choices=("oasst1", "lima"))
    q.add_argument("-o", "--output", required=True, help="raw JSONL to write (replaced atomically)")
    q.add_argument("--split", default="train", help="oasst1: train or validation; lima: train or test")
    q.add_argument("--seed", type=int, default=0, help="same seed, same file")
    q.add_argument("-n", type=_positive, default=None, help="rows (trees) instead of the real split size")
    q.add_argument("--flat", action="store_true", help="oasst1: the flat message table instead of nested trees")
    q.set_defaults(func=cmd_synth)


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {s!r})") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {s!r})")
    return v
