"""Prompt formats, tokenization and response-only labels.

A format turns a conversation into text plus the character spans of the assistant answers:

    guanaco        ### Human: {user}### Assistant: {assistant}<eos>     (per turn)
    lima_eot       {user} [EOT] {assistant}<eos>                        (per turn)
    chat_template  the tokenizer's own chat template (apply_chat_template)

Each assistant span starts exactly where `render_prompt` ends, so what generation asks the model to
continue is what training taught it to continue. Labels come from the token offsets of the whole
formatted text (a token is trained if it overlaps an answer span), not from searching token ids for
a marker string: a marker tokenizes differently depending on its neighbours, and a search that misses
silently trains on nothing or on everything.

The EOS *id* is inserted after every answer by position, never written as "</s>" text and left to
the tokenizer, which may split it into plain characters; it is trained on, so the model learns to
stop. A chat template that already ends a turn with the EOS token keeps its own.
"""
from __future__ import annotations

from typing import Optional

from ..errors import DataError

FORMATS = ("guanaco", "lima_eot", "chat_template")
IGNORE = -100  # label of a token that is not trained on (PyTorch cross-entropy's ignore_index)


def render_prompt(user_text: str, fmt: str, tokenizer=None) -> str:
    """Text up to where the assistant's answer starts (what generation feeds the model)."""
    if fmt == "guanaco":
        return f"### Human: {user_text}### Assistant:"
    if fmt == "lima_eot":
        return f"{user_text} [EOT] "
    if fmt == "chat_template":
        return _chat(tokenizer, [{"role": "user", "content": user_text}], add_generation_prompt=True)
    raise DataError(f"data.format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")


def _answer_text(assistant_text: str, fmt: str) -> str:
    # guanaco's prompt ends at "Assistant:", so the space before the answer belongs to the answer
    return " " + assistant_text if fmt == "guanaco" else assistant_text


def _chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", None) or "this tokenizer"
        raise DataError(f"data.format: chat_template needs a tokenizer with a chat template, and {name} "
                        f"has none; use guanaco or lima_eot")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _layout(messages, fmt: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Formatted text *without* inserted EOS, and the (start, end) character span of each answer."""
    if fmt == "chat_template":
        return _chat_layout(messages, tokenizer)
    parts, spans, pos = [], [], 0
    for m in messages:
        if m["role"] == "user":
            piece = render_prompt(m["content"], fmt)
        elif m["role"] == "assistant":
            piece = _answer_text(m["content"], fmt)
            spans.append((pos, pos + len(piece)))
        else:
            raise DataError(f"messages: unknown role {m['role']!r} (allowed: user, assistant)")
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _chat_layout(messages, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    # An answer spans from the end of the template's generation prompt to the end of its turn
    # (end-of-turn markup included, so the model learns to emit it).
    full = _chat(tokenizer, list(messages), add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _chat(tokenizer, list(messages[:i]), add_generation_prompt=True)
        upto = _chat(tokenizer, list(messages[: i + 1]), add_generation_prompt=False)
        if not (full.startswith(prefix) and full.startswith(upto) and len(upto) >= len(prefix)):
            raise DataError("data.format: this tokenizer's chat template does not render a conversation "
                            "as a prefix of its continuation, so answer spans cannot be located; "
                            "use guanaco or lima_eot")
        spans.append((len(prefix), len(upto)))
    return full, spans


def _eos(tokenizer) -> tuple[int, str]:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer: has no EOS token; fine-tuned models could not learn to stop")
    return tokenizer.eos_token_id, tokenizer.eos_token


def render(messages, fmt: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(text, answer spans) as trained, EOS written as its token text after each answer.

    For display and inspection; `tokenize_conversation` inserts the EOS id itself.
    """
    text, spans = _layout(messages, fmt, tokenizer)
    _, eos_text = _eos(tokenizer)
    out, new_spans, shift, pos = [], [], 0, 0
    for s, e in spans:
        out.append(text[pos:e])
        add = "" if fmt == "chat_template" and eos_text in text[s:e] else eos_text
        out.append(add)
        new_spans.append((s + shift, e + shift + len(add)))
        shift += len(add)
        pos = e
    out.append(text[pos:])
    return "".join(out), new_spans


def _encode(text: str, fmt: str, tokenizer):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("tokenizer: response-only labels need a fast tokenizer (token offsets); "
                        "load it with use_fast=True")
    # A chat template that writes BOS itself must not get a second one from the tokenizer.
    bos = tokenizer.bos_token
    add_special = not (fmt == "chat_template" and bos and text.startswith(bos))
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    ids, offsets, special = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    # Keep what the tokenizer puts in front (BOS); drop what it appends (some add EOS at the end):
    # the EOS that matters is the one inserted after each answer.
    lead = 0
    while lead < len(ids) and special[lead]:
        lead += 1
    end = len(ids)
    while end > lead and special[end - 1]:
        end -= 1
    return ids[:end], offsets[:end], lead


def encode_prompt(user_text: str, fmt: str, tokenizer) -> list[int]:
    """Token ids of `render_prompt`, with BOS exactly as in training (for generation)."""
    ids, _, _ = _encode(render_prompt(user_text, fmt, tokenizer), fmt, tokenizer)
    return list(ids)


def tokenize_conversation(messages, tokenizer, fmt: str, max_length: int, truncation_side: str = "right",
                          train_on_inputs: bool = False) -> Optional[dict]:
    """{"input_ids", "labels"} of one conversation, or None if no answer token survives truncation.

    Labels are the input ids on answer tokens (and on each answer's EOS), IGNORE elsewhere; with
    `train_on_inputs` every token but the leading BOS is trained. `max_length` counts every token,
    BOS and EOS included; "left" truncation keeps the BOS and cuts the oldest turns.
    """
    eos_id, _ = _eos(tokenizer)
    text, spans = _layout(messages, fmt, tokenizer)
    ids, offsets, lead = _encode(text, fmt, tokenizer)

    # Which span each token overlaps (-1: none). Leading specials have empty offsets: never answers.
    owner = [-1] * len(ids)
    for i in range(lead, len(ids)):
        s, e = offsets[i]
        for j, (a, b) in enumerate(spans):
            if s < b and e > a:
                owner[i] = j
                break
    # Insert EOS after the last token of each answer (or where an empty answer would have been).
    insert_after: dict[int, int] = {}
    for j, (a, _b) in enumerate(spans):
        toks = [i for i in range(len(ids)) if owner[i] == j]
        if fmt == "chat_template" and any(ids[i] == eos_id for i in toks):
            continue  # the template already ends the turn with EOS
        if toks:
            at = toks[-1]
        else:
            before = [i for i in range(lead, len(ids)) if offsets[i][0] < a]
            at = before[-1] if before else lead - 1
        insert_after[at] = insert_after.get(at, 0) + 1
    out_ids, answer = [], []
    for k in range(lead):
        out_ids.append(ids[k])
        answer.append(False)
    for _ in range(insert_after.get(lead - 1, 0)):
        out_ids.append(eos_id)
        answer.append(True)
    for i in range(lead, len(ids)):
        out_ids.append(ids[i])
        answer.append(owner[i] >= 0)
        for _ in range(insert_after.get(i, 0)):
            out_ids.append(eos_id)
            answer.append(True)

    if len(out_ids) > max_length:
        if truncation_side == "right":
            out_ids, answer = out_ids[:max_length], answer[:max_length]
        elif truncation_side == "left":
            keep = max(max_length - lead, 0)
            out_ids = out_ids[:lead] + out_ids[len(out_ids) - keep:]
            answer = answer[:lead] + answer[len(answer) - keep:]
        else:
            raise DataError(f"data.truncation_side: must be right or left (got {truncation_side!r})")
    if not any(answer):
        return None
    if train_on_inputs:
        labels = [IGNORE] * lead + out_ids[lead:]
    else:
        labels = [t if a else IGNORE for t, a in zip(out_ids, answer)]
    return {"input_ids": out_ids, "labels": labels}
