"""Models without a hub: real 7B shapes and tiny twins with random weights, and a byte-level tokenizer.

A random-init model is written to a local folder (config, safetensors, tokenizer) and then loaded
with ``from_pretrained`` exactly like a downloaded checkpoint, so QLoRA's real loading path
(quantization on load) is what runs. Its weights are random: compute and memory match the real
checkpoint of that shape, its text is gibberish.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Shapes of the published checkpoints (config.json of meta-llama/Llama-2-7b-hf, tiiuae/falcon-7b).
_SHAPES = {
    "llama2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "falcon-7b": dict(
        model_type="falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
        vocab_size=65024, max_position_embeddings=2048, layer_norm_epsilon=1e-5),
    # Tiny twins: same classes and code paths, a few layers, for CPU tests and the demo.
    "tiny-llama": dict(
        model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=320, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-falcon": dict(
        model_type="falcon", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
        vocab_size=320, max_position_embeddings=2048, layer_norm_epsilon=1e-5),
}
PRESETS = tuple(_SHAPES)
REAL_SHAPES = ("llama2-7b", "falcon-7b")  # the published checkpoints' shapes; the others are tiny twins
MARKER = "qlora_lab_random_init.json"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def model_config(preset: str):
    """A transformers config of the preset's shape."""
    from transformers import AutoConfig

    if preset not in _SHAPES:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    shape = dict(_SHAPES[preset])
    model_type = shape.pop("model_type")
    tok = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return AutoConfig.for_model(model_type, **shape, **tok)


def byte_tokenizer(add_bos: bool = True):
    """A byte-level tokenizer built in code: 4 special tokens then the 256 bytes, no merges.

    Every string round-trips; offsets map tokens to characters, as the response-only labels need.
    The pad token is distinct from EOS so padding never teaches the model to stop.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=4096, clean_up_tokenization_spaces=False)
    return fast


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to 256+n.
    return _bytes_to_unicode()[ch]


def _bytes_to_unicode() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def shape_note(preset: str) -> str:
    """'real shape' for the 7B presets only; a tiny twin is not the shape of any published model."""
    return "real shape" if preset in REAL_SHAPES else "tiny twin of the architecture"


def default_dtype(preset: str):
    import torch

    return torch.float32 if preset.startswith("tiny") else torch.bfloat16


def make_model(preset: str, out_dir, seed: int = 0, dtype=None, device: str | None = None) -> Path:
    """Write a random-init checkpoint of `preset` to `out_dir` (atomically: temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / MARKER).is_file():
        return out
    cfg = model_config(preset)
    dtype = dtype or default_dtype(preset)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not preset.startswith("tiny") else "cpu"
    # A private RNG: seeding the global one here would change the caller's LoRA init and data
    # order, and only on the run that happens to find the cache cold.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        byte_tokenizer(add_bos=cfg.model_type == "llama").save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "preset": preset, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
            "note": f"random weights: {shape_note(preset)}, meaningless text"}, indent=2))
        del model
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_LAB_CACHE", Path.home() / ".cache" / "qlora-lab")) / "models"


def cached_model(preset: str, seed: int = 0) -> Path:
    """Folder of the random-init checkpoint for (preset, seed), written on first use.

    A file lock makes concurrent processes (the ranks of a data-parallel run) write it once.
    """
    import fcntl

    out = cache_dir() / f"{preset}-seed{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_model(preset, out, seed=seed)


def random_init_info(path) -> dict | None:
    p = Path(path) / MARKER
    return json.loads(p.read_text()) if p.is_file() else None
