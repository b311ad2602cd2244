"""`qlora-lab export-gguf` on merged tiny Llama and Falcon runs, read back with gguf-py's GGUFReader and,
where llama-cpp-python is installed, run by llama.cpp itself.

Each architecture trains once per session (3 steps) and is merged (bf16) once (conftest.py's qlora_runs, shared
with the merge tests), then exported as f16 and bf16.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qlora_lab.cli import main
from qlora_lab.gguf_export import export, rope_rows
from qlora_lab.merge import CHECK_PROMPTS


@pytest.fixture(scope="module")
def exported(qlora_runs, tmp_path_factory):
    """{(arch, dtype): (merged folder, GGUF file)}."""
    out = {}
    for arch, (_, merged, _) in qlora_runs.items():
        for dtype in ("f16", "bf16"):
            f = tmp_path_factory.mktemp("gguf") / f"{arch}-{dtype}.gguf"
            export(merged, f, dtype=dtype)
            out[arch, dtype] = (merged, f)
    return out


def _weights(merged: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(merged / "model.safetensors")


def _expected_names(arch: str, n_layers: int, tied: bool) -> set:
    per_block = (["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                  "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"] if arch == "llama" else
                 ["attn_norm.weight", "attn_norm.bias", "attn_qkv.weight", "attn_output.weight", "ffn_up.weight",
                  "ffn_down.weight"])
    names = {f"blk.{i}.{n}" for i in range(n_layers) for n in per_block} | {"token_embd.weight", "output_norm.weight"}
    if arch == "falcon":
        names.add("output_norm.bias")
    if not tied:
        names.add("output.weight")
    return names


# Where each GGUF tensor comes from in the transformers checkpoint, and how its rows were reordered.
HF = {
    "llama": {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "model.layers.{i}.input_layernorm", "ffn_norm": "model.layers.{i}.post_attention_layernorm",
              "attn_q": "model.layers.{i}.self_attn.q_proj", "attn_k": "model.layers.{i}.self_attn.k_proj",
              "attn_v": "model.layers.{i}.self_attn.v_proj", "attn_output": "model.layers.{i}.self_attn.o_proj",
              "ffn_gate": "model.layers.{i}.mlp.gate_proj", "ffn_up": "model.layers.{i}.mlp.up_proj",
              "ffn_down": "model.layers.{i}.mlp.down_proj"},
    "falcon": {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f",
               "attn_norm": "transformer.h.{i}.input_layernorm", "attn_qkv": "transformer.h.{i}.self_attention.query_key_value",
               "attn_output": "transformer.h.{i}.self_attention.dense", "ffn_up": "transformer.h.{i}.mlp.dense_h_to_4h",
               "ffn_down": "transformer.h.{i}.mlp.dense_4h_to_h"},
}


def _hf_key(arch: str, gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return HF[arch][parts[2]].format(i=parts[1]) + "." + parts[3]
    return HF[arch][parts[0]] + "." + parts[1]


def _read(t) -> torch.Tensor:
    """A GGUFReader tensor as torch, in the transformers (rows, cols) shape."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(t.data)).reshape(shape)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_tensors_round_trip(exported, arch, dtype):
    merged, f = exported[arch, dtype]
    cfg = json.loads((merged / "config.json").read_text())
    weights = _weights(merged)
    r = gguf.GGUFReader(f)
    assert {t.name for t in r.tensors} == _expected_names(arch, cfg["num_hidden_layers"], cfg["tie_word_embeddings"])
    want_type = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.BF16
    for t in r.tensors:
        got = _read(t)
        src = weights[_hf_key(arch, t.name)]
        assert got.shape == src.shape, t.name
        if src.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, src.float()), t.name
            continue
        assert t.tensor_type == want_type, t.name
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            # Undo llama.cpp's adjacent rotary pairs: rows (2i, 2i+1) of a head go back to (i, i + d/2).
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            got = got.reshape(heads, -1, 2, got.shape[1]).transpose(1, 2).reshape(got.shape)
        # Falcon-7B's multi-query layout (all queries, key, value) is already llama.cpp's order.
        expect = src.to(torch.float16) if dtype == "f16" else src
        assert torch.equal(got, expect), t.name


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_metadata_and_tokenizer(exported, arch):
    from transformers import AutoTokenizer

    merged, f = exported[arch, "f16"]
    cfg = json.loads((merged / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(merged)
    r = gguf.GGUFReader(f)
    kv = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.architecture"] == arch and kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert kv[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert kv[f"{arch}.embedding_length"] == cfg["hidden_size"]
    assert kv[f"{arch}.block_count"] == cfg["num_hidden_layers"]
    assert kv[f"{arch}.attention.head_count"] == cfg["num_attention_heads"]
    assert kv[f"{arch}.rope.freq_base"] == cfg["rope_parameters"]["rope_theta"]
    if arch == "llama":
        assert kv["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
        assert kv["llama.feed_forward_length"] == cfg["intermediate_size"]
        assert kv["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
        assert kv["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    else:
        assert kv["falcon.attention.head_count_kv"] == 1  # multi-query
        assert kv["falcon.attention.layer_norm_epsilon"] == pytest.approx(cfg["layer_norm_epsilon"])
    tokens = kv["tokenizer.ggml.tokens"]
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(tokens) == cfg["vocab_size"]
    assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert kv["tokenizer.ggml.bos_token_id"] == tok.bos_token_id and kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert kv["tokenizer.ggml.add_bos_token"] is (arch == "llama")  # as our byte tokenizer does per architecture


def test_rope_rows_turn_transformers_rotary_into_adjacent_pairs():
    """RoPE on the reordered rows, rotating adjacent pairs (llama.cpp's llama graph), equals the same rows
    of transformers' RoPE (rotate_half) on the original rows; q and k move alike, so scores are unchanged."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from qlora_lab.presets import model_config

    cfg = model_config("tiny-llama")
    heads, d, seq = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, 5
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(heads * d, cfg.hidden_size, generator=g), torch.randn(seq, cfg.hidden_size, generator=g)
    pos = torch.arange(seq)[None]
    cos, sin = LlamaRotaryEmbedding(cfg)(x[None], pos)
    q = (x @ w.T).reshape(1, seq, heads, d).transpose(1, 2)
    hf, _ = apply_rotary_pos_emb(q, q, cos, sin)
    hf = hf.transpose(1, 2).reshape(seq, heads * d)

    qp = (x @ rope_rows(w, heads).T).reshape(seq, heads, d // 2, 2)
    theta = pos[0, :, None] * cfg.rope_parameters["rope_theta"] ** (-torch.arange(0, d, 2) / d)
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    pairs = torch.stack([qp[..., 0] * c - qp[..., 1] * s, qp[..., 0] * s + qp[..., 1] * c], -1).reshape(seq, -1)
    assert torch.allclose(pairs, rope_rows(hf.T, heads).T, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "falcon"])
def test_llama_cpp_greedy_tokens_match_transformers(exported, arch):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 builds "
                            "llama.cpp from source, ~5 min); the GGUF is checked by GGUFReader only")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged, f = exported[arch, "f16"]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    worst = 0.0
    for p in CHECK_PROMPTS:
        ids = tok(p)["input_ids"]
        assert llm.tokenize(p.encode(), add_bos=True, special=False) == ids, p  # same tokenizer
        llm.reset()
        llm.eval(ids)
        cpp = torch.from_numpy(np.array(llm.scores[:len(ids)]))
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([ids])).logits[0]
        worst = max(worst, float((cpp - hf).abs().max()))
        assert torch.equal(cpp.argmax(-1), hf.argmax(-1)), p  # greedy next token at every position
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        llm.reset()
        got = [t for _, t in zip(range(len(want)), llm.generate(ids, top_k=1, temp=0.0, reset=True))]
        assert got == want, p
    assert worst < 0.05, worst  # f16 matmuls in llama.cpp vs fp32 here, same weights
    print(f"{arch}: llama.cpp vs transformers, largest logit difference {worst:.2e}")


@pytest.fixture(scope="module")
def sentencepiece_llama(exported, tmp_path_factory):
    """The merged tiny Llama with a Llama-2-style tokenizer: a SentencePiece BPE model (byte fallback)
    trained here, beside the tokenizer.json transformers converts from it, exported as f16."""
    import io

    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("spm") / "llama"
    shutil.copytree(exported["llama", "f16"][0], d)
    for p in d.glob("tokenizer*"):
        p.unlink()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(CHECK_PROMPTS) * 20 + ["Paris is the capital of France."] * 20),
        model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True}))  # as Llama-2's
    AutoTokenizer.from_pretrained(d).save_pretrained(d)  # adds tokenizer.json, as a Llama-2 folder has
    f = d.parent / "llama-spm.gguf"
    export(d, f)
    return d, f


def test_sentencepiece_tokenizer(sentencepiece_llama):
    import sentencepiece

    d, f = sentencepiece_llama
    sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    kv = {k: v.contents() for k, v in gguf.GGUFReader(f).fields.items() if k.startswith("tokenizer.")}
    assert kv["tokenizer.ggml.model"] == "llama" and len(kv["tokenizer.ggml.tokens"]) == 320  # padded to the rows
    n = sp.get_piece_size()
    assert kv["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert kv["tokenizer.ggml.scores"][:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert kv["tokenizer.ggml.token_type"][3] == gguf.TokenType.BYTE  # <0x00>
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.bos_token_id"] == 1


def test_llama_cpp_sentencepiece_tokenizer_matches_transformers(sentencepiece_llama):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoTokenizer

    d, f = sentencepiece_llama
    tok = AutoTokenizer.from_pretrained(d)
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=256, n_threads=1, verbose=False)
    for p in list(CHECK_PROMPTS) + ["Paris is the capital of France.", "naïve café ☕"]:
        assert llm.tokenize(p.encode(), add_bos=True, special=False) == tok(p)["input_ids"], p


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,fragments", [
    ("run-folder", ["a run folder", "qlora-lab merge"]),
    ("adapter-folder", ["an adapter folder"]),
    ("4bit", ["quantized", "bitsandbytes", "16-bit"]),
    ("gpt2", ["architecture gpt2", "not supported", "llama, falcon"]),
    ("falcon-40b-layout", ["falcon", "40B", "not supported"]),
    ("no-config", ["no config.json"]),
    ("no-tokenizer", ["no tokenizer"]),
])
def test_bad_input_one_line_exit_2_nothing_written(exported, tmp_path, capsys, case, fragments):
    merged, _ = exported["llama", "f16"]
    src = tmp_path / "src"
    if case == "run-folder":
        src.mkdir()
        (src / "config.yaml").write_text("model:\n  random_init: tiny-llama\n")
        (src / "adapter").mkdir()
    elif case == "adapter-folder":
        src.mkdir()
        (src / "adapter_config.json").write_text("{}")
        (src / "adapter_model.safetensors").write_bytes(b"")
    else:
        shutil.copytree(merged, src)
        cfg = json.loads((src / "config.json").read_text())
        if case == "4bit":
            cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        elif case == "gpt2":
            cfg["model_type"] = "gpt2"
        elif case == "falcon-40b-layout":
            shutil.rmtree(src)
            shutil.copytree(exported["falcon", "f16"][0], src)
            cfg = json.loads((src / "config.json").read_text()) | {"new_decoder_architecture": True}
        elif case == "no-config":
            (src / "config.json").unlink()
        elif case == "no-tokenizer":
            for p in src.glob("tokenizer*"):
                p.unlink()
        if (src / "config.json").exists():
            (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out" / "model.gguf"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    rc = main(["export-gguf", str(src), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("qlora-lab: error:"), err
    assert all(frag in err for frag in fragments), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no file, no temp file


def test_cli_writes_and_replaces_atomically(exported, tmp_path, capsys):
    merged, _ = exported["falcon", "f16"]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    assert main(["export-gguf", str(merged), "-o", str(out), "--dtype", "bf16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "falcon"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
