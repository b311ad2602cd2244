"""A merged checkpoint as one GGUF file for llama.cpp: f16 or bf16 weights, metadata and tokenizer.

Written with gguf-py (llama.cpp's own writer), one tensor at a time, so memory stays at one tensor.
Where llama.cpp's layout differs from transformers':
  - Llama q/k rows: transformers keeps each head's rotary pairs as two halves (i, i + d/2); llama.cpp's
    llama graph rotates adjacent rows (2i, 2i + 1), so each head's rows are interleaved.
  - Falcon's fused query_key_value is grouped per kv head (its queries, key, value); llama.cpp splits
    it as all queries, then all keys, then all values.
  - 1-D tensors (norms, biases) stay float32, as llama.cpp's converter writes them.
Tokenizers: a byte-level BPE tokenizer.json (ours, Falcon's) becomes llama.cpp's "gpt2" vocabulary;
a SentencePiece tokenizer.model (Llama-2) its "llama" one (needs the sentencepiece package).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError

DTYPES = ("f16", "bf16")
SUPPORTED = ("llama", "falcon")


def export(merged_dir, out_file, dtype: str = "f16") -> dict:
    """Write merged_dir as a GGUF file (atomically); returns a summary of what was written."""
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: allowed: {', '.join(DTYPES)}")
    d = Path(merged_dir)
    cfg = _check_checkpoint(d)
    files = _weight_files(d)
    arch = gguf.MODEL_ARCH.LLAMA if cfg["model_type"] == "llama" else gguf.MODEL_ARCH.FALCON
    vocab = _vocab(d, cfg)
    plan = _tensor_plan(files, cfg, arch, dtype)
    n_rows = next(p["shape"][0] for p in plan if p["name"] == "token_embd.weight")
    if len(vocab["tokens"]) > n_rows:
        raise UserError(f"{d}: the tokenizer has {len(vocab['tokens'])} tokens, the embedding {n_rows} rows")
    n_tokens = len(vocab["tokens"])
    _pad_vocab(vocab, n_rows)  # rows past the tokenizer (embeddings padded to a multiple of 64)

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_metadata(w, d, cfg, dtype)
        _add_vocab(w, vocab)
        for p in plan:
            w.add_tensor_info(p["name"], p["shape"], p["np_dtype"], p["nbytes"], raw_dtype=p["raw_dtype"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p in plan:
            w.write_tensor_data(_load(files, p))
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"file": str(out), "architecture": cfg["model_type"], "dtype": dtype, "tensors": len(plan),
            "tokenizer": vocab["model"], "tokens": n_tokens, "bytes": out.stat().st_size}


# ----------------------------------------------------------------------------- what the folder is

def _check_checkpoint(d: Path) -> dict:
    if not d.is_dir():
        raise UserError(f"{d}: folder not found")
    if (d / "config.yaml").is_file():
        raise UserError(f"{d}: a run folder, not a merged checkpoint; first: qlora-lab merge {d} -o MERGED_DIR")
    if (d / "adapter_config.json").is_file():
        raise UserError(f"{d}: an adapter folder, not a merged checkpoint; merge its run first (qlora-lab merge RUN)")
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: not a model checkpoint (no config.json)")
    cfg = json.loads((d / "config.json").read_text())
    if cfg.get("quantization_config"):
        kind = cfg["quantization_config"].get("quant_method", "quantized")
        raise UserError(f"{d}: a quantized checkpoint ({kind}); GGUF export needs 16-bit weights "
                        "(qlora-lab merge writes them)")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED:
        raise UserError(f"{d}: architecture {mt} is not supported (supported: {', '.join(SUPPORTED)})")
    problem = _unsupported_variant(cfg)
    if problem:
        raise UserError(f"{d}: {mt} with {problem} is not supported by this exporter")
    return cfg


def _unsupported_variant(cfg: dict) -> str | None:
    """The layouts llama.cpp's llama/falcon graphs and this exporter agree on: Llama-2 and Falcon-7B."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope['rope_type']}"
    if cfg["model_type"] == "llama":
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            return "biases"
        if (cfg.get("head_dim") or _head_dim(cfg)) != _head_dim(cfg):
            return "head_dim != hidden_size / num_attention_heads"
        return None
    for key, bad, what in (("new_decoder_architecture", True, "the 40B/180B layout"), ("alibi", True, "alibi"),
                           ("bias", True, "biases"), ("parallel_attn", False, "sequential attention")):
        if cfg.get(key, not bad) == bad:
            return what
    return None


def _weight_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no safetensors weights (pickle .bin files are not read)")
    return files


# ----------------------------------------------------------------------------- metadata

def _head_dim(cfg: dict) -> int:
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def _n_kv(cfg: dict) -> int:
    if cfg["model_type"] == "llama":
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return 1 if cfg.get("multi_query", True) else cfg["num_attention_heads"]  # Falcon-7B layout


def _add_metadata(w, d: Path, cfg: dict, dtype: str) -> None:
    import gguf

    rope = cfg.get("rope_parameters") or {}
    w.add_name(d.resolve().name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(_n_kv(cfg))
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_vocab_size(cfg["vocab_size"])
    if cfg["model_type"] == "llama":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_rope_dimension_count(_head_dim(cfg))
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    else:
        w.add_feed_forward_length(cfg.get("ffn_hidden_size") or 4 * cfg["hidden_size"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])


# ----------------------------------------------------------------------------- tensors

def _tensor_plan(files: list[Path], cfg: dict, arch, dtype: str) -> list[dict]:
    """Name, shape, type and source of every tensor, from the safetensors headers (no data read)."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, cfg["num_hidden_layers"])
    plan = []
    for i, path in enumerate(files):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise UserError(f"{path}: tensor {key} has no llama.cpp name: not a {cfg['model_type']} checkpoint "
                                    "this exporter knows")
                sl = f.get_slice(key)
                if sl.get_dtype() not in ("F32", "F16", "BF16"):
                    raise UserError(f"{path}: tensor {key} is {sl.get_dtype()}; export needs 16-bit weights "
                                    "(a quantized checkpoint?)")
                shape = tuple(sl.get_shape())
                if len(shape) == 1:
                    np_dtype, raw = np.dtype(np.float32), None
                elif dtype == "f16":
                    np_dtype, raw = np.dtype(np.float16), None
                else:  # numpy has no bf16: the bits travel as int16 and are labelled BF16
                    np_dtype, raw = np.dtype(np.int16), gguf.GGMLQuantizationType.BF16
                plan.append({"name": name, "key": key, "file": i, "shape": shape, "np_dtype": np_dtype,
                             "raw_dtype": raw, "nbytes": int(np.prod(shape)) * np_dtype.itemsize,
                             "reorder": _reorder_for(name, cfg)})
    return plan


def _reorder_for(name: str, cfg: dict):
    if cfg["model_type"] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = cfg["num_attention_heads"] if "attn_q" in name else _n_kv(cfg)
        return ("rope", heads)
    if cfg["model_type"] == "falcon" and name.endswith("attn_qkv.weight"):
        return ("qkv", cfg["num_attention_heads"], _n_kv(cfg))
    return None


def rope_rows(w, n_heads: int):
    """transformers' (half, half) rotary row order per head -> llama.cpp's adjacent pairs."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def falcon_qkv_rows(w, n_heads: int, n_kv: int):
    """Per kv group (queries, key, value) -> all queries, all keys, all values."""
    import torch

    g = n_heads // n_kv
    grouped = w.reshape(n_kv, g + 2, -1, w.shape[-1])
    q, k, v = grouped[:, :g], grouped[:, g], grouped[:, g + 1]
    return torch.cat([q.reshape(-1, w.shape[-1]), k.reshape(-1, w.shape[-1]), v.reshape(-1, w.shape[-1])])


def _load(files: list[Path], p: dict):
    import torch
    from safetensors import safe_open

    with safe_open(str(files[p["file"]]), framework="pt") as f:
        t = f.get_tensor(p["key"])
    r = p["reorder"]
    if r and r[0] == "rope":
        t = rope_rows(t, r[1])
    elif r:
        t = falcon_qkv_rows(t, r[1], r[2])
    if p["raw_dtype"] is not None:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if p["np_dtype"].itemsize == 2:
        t = t.to(torch.float16)
        if not torch.isfinite(t).all():
            raise UserError(f"tensor {p['key']} does not fit in f16 (values beyond ±65504); use --dtype bf16")
        return t.contiguous().numpy()
    return t.to(torch.float32).contiguous().numpy()


# ----------------------------------------------------------------------------- tokenizer

def _vocab(d: Path, cfg: dict) -> dict:
    """tokens, types (and scores or merges), special ids, whether BOS/EOS are added, for llama.cpp."""
    import gguf
    from transformers import AutoTokenizer

    if not (d / "tokenizer.json").is_file() and not (d / "tokenizer.model").is_file():
        raise UserError(f"{d}: no tokenizer (tokenizer.json or tokenizer.model)")
    tok = AutoTokenizer.from_pretrained(str(d))
    v = {"scores": None, "merges": None, "pre": None}
    spec = json.loads((d / "tokenizer.json").read_text()) if (d / "tokenizer.json").is_file() else {}
    model = spec.get("model", {})
    byte_level = (model.get("type") == "BPE" and not model.get("byte_fallback")
                  and (spec.get("decoder") or {}).get("type") == "ByteLevel")
    if (d / "tokenizer.model").is_file():
        try:
            sp = gguf.SentencePieceVocab(d)
        except RuntimeError as e:  # sentencepiece is not installed
            raise UserError(f"{d}: the SentencePiece tokenizer (tokenizer.model) needs the sentencepiece "
                            f"package: pip install sentencepiece ({e})") from None
        rows = list(sp.all_tokens())
        v.update(model="llama", tokens=[t for t, _, _ in rows], scores=[s for _, s, _ in rows],
                 types=[int(k) for _, _, k in rows])
    elif byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if merges and cfg["model_type"] != "falcon":
            raise UserError(f"{d}: a byte-level BPE tokenizer with merges on {cfg['model_type']}: which "
                            "pre-tokenizer llama.cpp should use is unknown to this exporter")
        # llama.cpp requires a merges list and gguf-py cannot write an empty one: a merge of two
        # multi-character tokens can never fire (a merge-free vocabulary starts from single bytes).
        first = [t for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]) if len(t) > 1][:2]
        v.update(model="gpt2", pre="falcon" if merges else "default", merges=merges or [" ".join(first)])
        specials = set(tok.all_special_ids)
        added = {i for i in tok.added_tokens_decoder}
        id_to_tok = {i: t for t, i in tok.get_vocab().items()}
        n = max(id_to_tok) + 1
        v["tokens"] = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n)]
        v["types"] = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.USER_DEFINED if i in added
                          else gguf.TokenType.NORMAL if i in id_to_tok else gguf.TokenType.UNUSED)
                      for i in range(n)]
    else:
        raise UserError(f"{d}: tokenizer not supported (a byte-level BPE tokenizer.json or a SentencePiece "
                        "tokenizer.model are)")
    ids = tok("a")["input_ids"]
    v["special"] = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    v["add_bos"] = tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id]
    v["add_eos"] = tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]
    v["chat_template"] = tok.chat_template if isinstance(tok.chat_template, str) else None
    return v


def _pad_vocab(v: dict, n_rows: int) -> None:
    import gguf

    for i in range(len(v["tokens"]), n_rows):
        v["tokens"].append(f"[PAD{i}]")
        v["types"].append(int(gguf.TokenType.UNUSED))
        if v["scores"] is not None:
            v["scores"].append(-1000.0)


def _add_vocab(w, v: dict) -> None:
    w.add_tokenizer_model(v["model"])
    if v["pre"]:
        w.add_tokenizer_pre(v["pre"])
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    if v["scores"] is not None:
        w.add_token_scores(v["scores"])
    if v["merges"]:
        w.add_token_merges(v["merges"])
    for k, i in v["special"].items():
        if i is not None:
            getattr(w, f"add_{k}_token_id")(i)
    w.add_add_bos_token(v["add_bos"])
    w.add_add_eos_token(v["add_eos"])
    if v["chat_template"]:
        w.add_chat_template(v["chat_template"])
