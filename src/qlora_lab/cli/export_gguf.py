"""`qlora-lab export-gguf MERGED_DIR -o FILE.gguf`: a merged checkpoint as a GGUF file for llama.cpp."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-gguf", help="write a merged checkpoint as a GGUF file (llama.cpp, Ollama, LM Studio)",
        description="Write a merged checkpoint (from qlora-lab merge) as one GGUF file: f16 or bf16 weights, "
                    "architecture metadata and the tokenizer, with llama.cpp's tensor names. Llama and Falcon. "
                    "Quantize it further with llama.cpp's llama-quantize if you want.")
    p.add_argument("merged_dir", metavar="MERGED_DIR", help="folder written by qlora-lab merge")
    p.add_argument("-o", "--output", required=True, metavar="FILE.gguf",
                   help="GGUF file to write (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=("f16", "bf16"), default="f16",
                   help="weight type (default: %(default)s, which every llama.cpp backend runs; norms stay f32)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..gguf_export import export

    r = export(args.merged_dir, args.output, dtype=args.dtype)
    print(f"wrote {r['file']}: {r['architecture']}, {r['dtype']}, {r['tensors']} tensors, tokenizer "
          f"{r['tokenizer']} ({r['tokens']} tokens), {r['bytes'] / 2**20:.1f} MiB")
    return 0
