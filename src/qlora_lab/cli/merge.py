"""`qlora-lab merge RUN -o DIR`: the run's adapter merged into its 16-bit base, a plain transformers checkpoint."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="merge a run's adapter into its 16-bit base (a checkpoint to serve without peft)",
        description="Merge a run's LoRA adapter into the 16-bit base its config names (or --base) and write a "
                    "standard transformers checkpoint: safetensors, config, tokenizer, generation config. It "
                    "loads with AutoModelForCausalLM.from_pretrained alone (no peft, no bitsandbytes). The merge "
                    "is done in fp32, then cast to --dtype. Checks (largest logit difference on a few prompts, "
                    "in fp32) against the unmerged adapter and, for QLoRA runs, the 4-bit model it trained on "
                    "are printed and recorded in DIR/merge.json.")
    p.add_argument("run", metavar="RUN", help="run folder (config.yaml + adapter/)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="new or empty folder to write")
    p.add_argument("--base", default=None, metavar="PATH_OR_HUB_ID",
                   help="16-bit base to merge into (default: the one the run's config names; for a random_init "
                        "run, the same random weights training used)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                   help="dtype of the written weights (default: %(default)s; fp16 for GPUs without bf16)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merge import RECORD, describe, merge

    record = merge(args.run, args.output, base=args.base, dtype=args.dtype)
    print(f"merged {record['method']} adapter of {record['run']} into {record['base']} -> {args.output} "
          f"({record['dtype']})")
    for line in describe(record):
        print(line)
    print(f"recorded in {args.output}/{RECORD}")
    return 0
