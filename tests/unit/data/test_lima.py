"""LIMA rows -> prepared conversations: single-turn, multi-turn, and prompt-only test rows."""
from __future__ import annotations

import json

import pytest

from qlora_lab.data.lima import conversations, prepare_lima
from qlora_lab.errors import DataError

from .conftest import FIXTURES

SAMPLE = FIXTURES / "lima_sample.jsonl"


def test_rows_become_alternating_conversations_with_eot_text():
    rows, counts = conversations(SAMPLE)
    assert [r["id"] for r in rows] == ["lima-0", "lima-1", "lima-2", "lima-3", "lima-4"]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water for 7 to 9 minutes, then cool it in cold water."}]
    assert rows[2]["text"] == "What is 2 + 2? [EOT] 4. [EOT] And times 3? [EOT] 12. [EOT] Thanks! [EOT] You're welcome."
    assert [m["role"] for m in rows[2]["messages"]] == ["user", "assistant"] * 3
    assert rows[4]["messages"][0]["content"] == 'Ünïcödé prompt: what does "naïve" mean?'
    assert (counts.rows_read, counts.written, counts.multi_turn, counts.prompt_only) == (5, 5, 1, 1)


def test_prompt_only_row_is_kept_and_marked():
    rows, _ = conversations(SAMPLE)
    assert rows[3] == {"id": "lima-3", "messages": [{"role": "user", "content": "Tell me a joke about cats."}],
                       "text": "Tell me a joke about cats.", "prompt_only": True}
    assert all("prompt_only" not in r for i, r in enumerate(rows) if i != 3)


def test_prepare_writes_file(tmp_path):
    out = tmp_path / "lima.jsonl"
    counts = prepare_lima(SAMPLE, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and json.loads(lines[1])["id"] == "lima-1"
    assert "1 prompt-only" in counts.summary()


@pytest.mark.parametrize("name,message", [
    ("bad_lima_turn_type.jsonl", ":2: conversations[1]: must be a string"),
    ("bad_lima_missing.jsonl", ":3: conversations: missing"),
    ("bad_empty.jsonl", ": empty file"),
    ("bad_oasst1_json.jsonl", ":1: conversations: missing"),  # valid JSON, but OASST1 rows
])
def test_bad_lima_input(tmp_path, name, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as e:
        prepare_lima(FIXTURES / name, out)
    assert str(e.value).startswith(f"{FIXTURES / name}{message}")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_conversation_rejected(tmp_path):
    src = tmp_path / "lima.jsonl"
    src.write_text('{"conversations": ["Q", "A"]}\n{"conversations": []}\n')
    with pytest.raises(DataError, match=r"lima\.jsonl:2: conversations: empty conversation"):
        conversations(src)
