"""The prepared format every data command writes and training reads, one conversation per line:

    {"id": ..., "messages": [{"role": "user"|"assistant", "content": ...}, ...], "text": ...}

Roles alternate, starting with the user. A row whose conversation has no assistant turn (LIMA's test
prompts) carries ``"prompt_only": true``: generation can use it, training skips it and counts it.
"""
from __future__ import annotations

from ..errors import DataError, where
from .jsonl import field

ROLES = ("user", "assistant")


def check_messages(messages, path, line, label: str = "messages") -> list[dict]:
    """Validate a `messages` list (types, known roles, alternation from `user`); return it."""
    if not isinstance(messages, list):
        raise DataError(f"{where(path, line, label)}: must be an array of {{role, content}} objects")
    if not messages:
        raise DataError(f"{where(path, line, label)}: empty conversation")
    for i, m in enumerate(messages):
        at = f"{label}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where(path, line, at)}: must be an object with role and content")
        role = field(m, "role", str, path, line, label=f"{at}.role")
        field(m, "content", str, path, line, label=f"{at}.content")
        if role not in ROLES:
            raise DataError(f"{where(path, line, at + '.role')}: must be user or assistant (got {role!r})")
        expected = ROLES[i % 2]
        if role != expected:
            raise DataError(f"{where(path, line, at + '.role')}: roles must alternate starting with user; "
                            f"expected {expected}, got {role}")
    return messages


def has_answer(messages) -> bool:
    return any(m["role"] == "assistant" for m in messages)


def guanaco_text(messages) -> str:
    """`### Human: {user}### Assistant: {assistant}` per turn (timdettmers/openassistant-guanaco)."""
    out = []
    for m in messages:
        out.append(("### Human: " if m["role"] == "user" else "### Assistant: ") + m["content"])
    return "".join(out)


def eot_text(messages) -> str:
    """Turns joined with ` [EOT] `, as in the LIMA / Llama-2 study."""
    return " [EOT] ".join(m["content"] for m in messages)


def record(conv_id, messages, text: str) -> dict:
    row = {"id": conv_id, "messages": messages, "text": text}
    if not has_answer(messages):
        row["prompt_only"] = True
    return row
