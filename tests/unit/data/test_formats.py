"""Prompt formats, EOS after every answer, response-only labels from offsets, truncation."""
from __future__ import annotations

import pytest

from qlora_lab.data.formats import IGNORE, encode_prompt, render, render_prompt, tokenize_conversation
from qlora_lab.errors import DataError
from qlora_lab.presets import byte_tokenizer

TWO_TURNS = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
ONE_TURN = TWO_TURNS[:2]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _trained_text(tok, ex):
    return tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE])


def _bpe_tokenizer():
    """A byte-level BPE with real merges (" Paris" is one token), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = ["### Human: What is the capital of France?### Assistant: Paris is the capital.",
              "Paris Paris Paris capital capital France France ### Human ### Assistant"] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def test_guanaco_and_lima_eot_text_and_spans(tok):
    text, spans = render(TWO_TURNS, "guanaco", tok)
    assert text == "### Human: Hi?### Assistant: Yo.</s>### Human: Q2### Assistant: A2</s>"
    assert [text[a:b] for a, b in spans] == [" Yo.</s>", " A2</s>"]
    text, spans = render(TWO_TURNS, "lima_eot", tok)
    assert text == "Hi? [EOT] Yo.</s>Q2 [EOT] A2</s>"
    assert [text[a:b] for a, b in spans] == ["Yo.</s>", "A2</s>"]


@pytest.mark.parametrize("fmt,prompt", [("guanaco", "### Human: What is X?### Assistant:"),
                                        ("lima_eot", "What is X? [EOT] ")])
def test_render_prompt_is_exactly_where_the_trained_answer_starts(tok, fmt, prompt):
    msgs = [{"role": "user", "content": "What is X?"}, {"role": "assistant", "content": "X."}]
    assert render_prompt("What is X?", fmt, tok) == prompt
    text, spans = render(msgs, fmt, tok)
    assert text.startswith(prompt) and spans[0][0] == len(prompt)
    ex = tokenize_conversation(msgs, tok, fmt, 512)
    first_trained = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE)
    assert ex["input_ids"][:first_trained] == encode_prompt("What is X?", fmt, tok)


@pytest.mark.parametrize("fmt,answers", [("guanaco", " Yo.</s> A2</s>"), ("lima_eot", "Yo.</s>A2</s>")])
def test_labels_cover_every_answer_and_its_eos_only(tok, fmt, answers):
    ex = tokenize_conversation(TWO_TURNS, tok, fmt, 512)
    assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == IGNORE
    assert _trained_text(tok, ex) == answers
    eos_at = [i for i, t in enumerate(ex["input_ids"]) if t == tok.eos_token_id]
    assert len(eos_at) == 2 and eos_at[-1] == len(ex["input_ids"]) - 1
    assert all(ex["labels"][i] == tok.eos_token_id for i in eos_at)
    assert len(ex["input_ids"]) == len(ex["labels"])


@pytest.mark.parametrize("fmt,answers", [("guanaco", " Yo.</s> A2</s>"), ("lima_eot", "Yo.</s>A2</s>"),
                                         ("chat_template", "Yo.END</s>A2END</s>")])
def test_a_final_unanswered_user_turn_is_context_only(fmt, answers):
    # `data oasst1 --keep-unanswered-prompt` writes conversations that end on the user's turn
    t = byte_tokenizer()
    t.chat_template = _TEMPLATE
    msgs = TWO_TURNS + [{"role": "user", "content": "Q3"}]
    ex = tokenize_conversation(msgs, t, fmt, 512)
    assert _trained_text(t, ex) == answers
    without = tokenize_conversation(TWO_TURNS, t, fmt, 512)
    n = len(without["input_ids"])
    assert ex["input_ids"][:n] == without["input_ids"] and ex["labels"][:n] == without["labels"]
    assert "Q3" in t.decode(ex["input_ids"][n:]) and set(ex["labels"][n:]) == {IGNORE}
    assert tokenize_conversation(msgs, t, fmt, 512, train_on_inputs=True)["labels"][n:] == ex["input_ids"][n:]


def test_offsets_label_merged_tokens_on_a_real_bpe():
    bpe = _bpe_tokenizer()
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital."}]
    ex = tokenize_conversation(msgs, bpe, "guanaco", 512)
    pieces = bpe.convert_ids_to_tokens(ex["input_ids"])
    assert "ĠParis" in pieces  # the space before the answer is merged into its first token
    first = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE)
    assert pieces[first] == "ĠParis"
    assert _trained_text(bpe, ex) == " Paris is the capital.</s>"
    assert ex["input_ids"][:first] == encode_prompt(msgs[0]["content"], "guanaco", bpe)


def test_eos_is_inserted_as_an_id_even_when_its_text_would_not_parse(tok):
    # An answer that *contains* the text "</s>" must not end the turn early or replace the real EOS.
    msgs = [{"role": "user", "content": "Say </s>"}, {"role": "assistant", "content": "ok"}]
    ex = tokenize_conversation(msgs, tok, "lima_eot", 512)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["labels"][-1] == tok.eos_token_id
    assert _trained_text(tok, ex) == "ok</s>"


def test_no_bos_tokenizer_gets_none(tok):
    falcon_like = byte_tokenizer(add_bos=False)
    ex = tokenize_conversation(ONE_TURN, falcon_like, "guanaco", 512)
    assert falcon_like.bos_token_id not in ex["input_ids"]
    assert ex["input_ids"][0] == falcon_like.convert_tokens_to_ids("#")


def test_train_on_inputs_trains_everything_but_bos(tok):
    ex = tokenize_conversation(TWO_TURNS, tok, "guanaco", 512, train_on_inputs=True)
    assert ex["labels"] == [IGNORE] + ex["input_ids"][1:]


def test_right_truncation_keeps_the_start_and_drops_a_lost_answer(tok):
    full = tokenize_conversation(ONE_TURN, tok, "lima_eot", 512)  # <s> "Hi? [EOT] " "Yo." </s> = 15 tokens
    assert len(full["input_ids"]) == 15
    cut = tokenize_conversation(ONE_TURN, tok, "lima_eot", 12)
    assert cut["input_ids"] == full["input_ids"][:12]
    assert _trained_text(tok, cut) == "Y"  # one answer token survives: still an example
    assert tokenize_conversation(ONE_TURN, tok, "lima_eot", 11) is None  # only the prompt is left
    assert tokenize_conversation(ONE_TURN, tok, "lima_eot", 11, train_on_inputs=True) is None


def test_left_truncation_keeps_bos_and_the_last_turn(tok):
    ex = tokenize_conversation(TWO_TURNS, tok, "lima_eot", 12, truncation_side="left")
    assert ex["input_ids"][0] == tok.bos_token_id and len(ex["input_ids"]) == 12
    assert tok.decode(ex["input_ids"][1:]) == "2 [EOT] A2</s>"  # 10 byte tokens + EOS
    assert _trained_text(tok, ex) == "A2</s>"


# A minimal chat template in the Zephyr style; {{ eos_token }} optional to test both cases.
_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
             "{% if m['role'] == 'assistant' %}END{% endif %}\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_inserts_eos_when_the_template_has_none():
    t = byte_tokenizer()
    t.chat_template = _TEMPLATE
    assert render_prompt("Hi?", "chat_template", t) == "<|user|>Hi?<|assistant|>"
    ex = tokenize_conversation(TWO_TURNS, t, "chat_template", 512)
    assert ex["input_ids"].count(t.bos_token_id) == 1
    assert _trained_text(t, ex) == "Yo.END</s>A2END</s>"
    text, _ = render(TWO_TURNS, "chat_template", t)
    assert text == "<|user|>Hi?<|assistant|>Yo.END</s><|user|>Q2<|assistant|>A2END</s>"


def test_chat_template_keeps_its_own_eos_and_bos():
    t = byte_tokenizer()
    t.chat_template = "{{ bos_token }}" + _TEMPLATE.replace("END", "{{ eos_token }}")
    ex = tokenize_conversation(TWO_TURNS, t, "chat_template", 512)
    assert ex["input_ids"].count(t.bos_token_id) == 1  # the template's, not a second one
    assert ex["input_ids"].count(t.eos_token_id) == 2  # one per answer, not doubled
    assert _trained_text(t, ex) == "Yo.</s>A2</s>"
    first = next(i for i, lab in enumerate(ex["labels"]) if lab != IGNORE)
    assert ex["input_ids"][:first] == encode_prompt("Hi?", "chat_template", t)


def test_chat_template_without_one_names_the_key(tok):
    with pytest.raises(DataError, match="data.format: chat_template needs a tokenizer with a chat template"):
        tokenize_conversation(ONE_TURN, tok, "chat_template", 512)
    with pytest.raises(DataError, match="data.format: unknown format 'alpaca'"):
        render_prompt("x", "alpaca", tok)
