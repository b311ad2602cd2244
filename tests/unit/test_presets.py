from __future__ import annotations

import json

import pytest
import torch

from qlora_lab.presets import MARKER, byte_tokenizer, make_model, model_config



def _params_on_meta(preset):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(model_config(preset))
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("preset,expected", [("llama2-7b", 6_738_415_616), ("falcon-7b", 6_921_720_704)])
def test_7b_presets_have_the_published_parameter_counts(preset, expected):
    # Parameter counts of meta-llama/Llama-2-7b-hf and tiiuae/falcon-7b.
    assert _params_on_meta(preset) == expected


def test_falcon_shape_is_multi_query_parallel_attention():
    c = model_config("falcon-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (4544, 32, 71, 65024)
    assert c.multi_query and c.parallel_attn and not c.new_decoder_architecture


def test_llama_shape():
    c = model_config("llama2-7b")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (
        4096, 32, 32, 11008, 32000)


def test_byte_tokenizer_round_trips_and_pad_is_not_eos():
    tok = byte_tokenizer()
    text = "Grüße, 世界! [EOT] tabs\tand\nnewlines"
    enc = tok(text, return_offsets_mapping=True)
    assert tok.decode(enc.input_ids, skip_special_tokens=True) == text
    assert enc.input_ids[0] == tok.bos_token_id
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    # offsets cover the text: every non-special token maps to a non-empty character span
    spans = [o for i, o in zip(enc.input_ids, enc.offset_mapping) if i >= 4]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_model("tiny-falcon", tmp_path / "m", seed=3)
    assert json.loads((out / MARKER).read_text())["preset"] == "tiny-falcon"
    m = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert m.config.model_type == "falcon" and tok.eos_token_id == 2
    assert not list(tmp_path.glob(".m.*")), "temp folder left behind"


def test_make_model_cli(tmp_path, cli):
    r = cli("make-model", "tiny-llama", tmp_path / "tl")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tl" / "model.safetensors").is_file()
    assert (tmp_path / "tl" / "tokenizer.json").is_file()
