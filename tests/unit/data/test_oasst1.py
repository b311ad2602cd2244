"""OASST1 trees -> best paths: the selection rule on hand-written trees, in both input forms."""
from __future__ import annotations

import gzip
import json
import shutil

import pytest

from qlora_lab.data.oasst1 import best_path, build_trees, conversations, prepare_oasst1, read_messages
from qlora_lab.errors import DataError

from .conftest import FIXTURES

FLAT = FIXTURES / "oasst1_messages.jsonl"
FLAT_GZ = FIXTURES / "oasst1_messages.jsonl.gz"
TREES = FIXTURES / "oasst1_export.trees.jsonl"
NO_DATES = FIXTURES / "oasst1_export_no_dates.trees.jsonl"  # as OpenAssistant exports: nulls, no created_date


def _conv(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


# What the rule gives on the fixture (see the comments in the file that builds each tree):
#   t1: rank 0 over rank 1; ranked "Berlin." (rank 0) over unranked "Munich." created earlier
#   t5: German, first seen on line 2, so second in the output
#   t2: deleted rank-0 reply skipped with its subtree; rank tie -> earliest date ("Red.");
#       the path ends on a prompter ("Why red?", smallest id among full ties) which is dropped
#   t3 not ready_for_export, t4 only reply deleted, t6 root deleted: nothing
EXPECTED = [
    {"id": "t1",
     "messages": _conv("What is the capital of France?", "Paris.", "And of Germany?", "Berlin."),
     "text": "### Human: What is the capital of France?### Assistant: Paris.### Human: And of Germany?"
             "### Assistant: Berlin."},
    {"id": "t5", "messages": _conv("Wie spät ist es?", "Es ist acht Uhr."),
     "text": "### Human: Wie spät ist es?### Assistant: Es ist acht Uhr."},
    {"id": "t2", "messages": _conv("Name a colour.", "Red."),
     "text": "### Human: Name a colour.### Assistant: Red."},
]


@pytest.mark.parametrize("path", [FLAT, FLAT_GZ, TREES], ids=["flat", "flat-gz", "trees"])
def test_exact_conversations_from_every_input_form(path):
    rows, counts = conversations(path)
    assert rows == EXPECTED
    assert (counts.trees_read, counts.written, counts.ended_on_prompter) == (6, 3, 1)
    assert dict(counts.dropped) == {"root deleted": 1, "tree_state not ready_for_export": 1,
                                    "language": 0, "no assistant reply": 1}


def test_trailing_prompter_is_the_smallest_id_of_a_full_tie():
    # Without the trim the path would end on t2-c1 ("Why red?"), not t2-c2: same rank (none), same date.
    label, messages, _ = read_messages(FLAT)
    roots = build_trees(messages, label)
    assert [m.id for m in best_path(roots["t2"])] == ["t2", "t2-b3", "t2-c1"]
    assert [m.id for m in best_path(roots["t1"])] == ["t1", "t1-a2", "t1-p3", "t1-a6"]


# What the rule gives on the nested export without created_date (nulls where OpenAssistant's schema
# allows them); ties go to the order of `replies`, not to message_id:
#   n1: rank 0 over 1 and unranked; two unranked prompters, "Which light?" (n1-p9) listed before
#       "Thanks." (n1-p2) wins although its id is larger
#   n2: the prompter's only reply is deleted, so the path ends on it (the shape of Guanaco's row 0)
#   n3: root lang null; "Something." (n3-z) listed before "Anything." (n3-a); ends on a prompter
#       with an empty reply list
#   n4: tree_state null (tree used), root without replies (replies null): nothing; n5 not ready
NO_DATES_EXPECTED = [
    {"id": "n1",
     "messages": _conv("How do plants eat?", "They make sugar from light.", "Which light?", "Mostly red and blue."),
     "text": "### Human: How do plants eat?### Assistant: They make sugar from light.### Human: Which light?"
             "### Assistant: Mostly red and blue."},
    {"id": "n2", "messages": _conv("Explain gravity.", "Masses pull on each other."),
     "text": "### Human: Explain gravity.### Assistant: Masses pull on each other."},
    {"id": "n3", "messages": _conv("Say something.", "Something."),
     "text": "### Human: Say something.### Assistant: Something."},
]


def test_nested_export_without_dates_and_with_nulls_ties_by_export_order():
    rows, counts = conversations(NO_DATES)
    assert rows == NO_DATES_EXPECTED
    assert (counts.trees_read, counts.written, counts.ended_on_prompter) == (5, 3, 2)
    assert dict(counts.dropped) == {"root deleted": 0, "tree_state not ready_for_export": 1,
                                    "language": 0, "no assistant reply": 1}
    label, messages, _ = read_messages(NO_DATES)
    assert all(m.created is None for m in messages)
    assert [m.id for m in messages if m.deleted] == ["n2-a2"]  # deleted: null means not deleted
    rows, counts = conversations(NO_DATES, langs=["en"])  # a null lang matches no language
    assert [r["id"] for r in rows] == ["n1", "n2"] and counts.dropped["language"] == 1


def test_keep_unanswered_prompt_gives_the_guanaco_form_on_the_nested_export():
    rows, counts = conversations(NO_DATES, keep_unanswered_prompt=True)
    assert rows[0] == NO_DATES_EXPECTED[0]  # ends on an answer: unchanged
    assert rows[1]["messages"] == _conv("Explain gravity.", "Masses pull on each other.", "Now explain it to a dog")
    assert rows[1]["text"] == ("### Human: Explain gravity.### Assistant: Masses pull on each other."
                               "### Human: Now explain it to a dog")
    assert rows[2]["messages"] == _conv("Say something.", "Something.", "Again?")
    assert rows[2]["text"].endswith("### Assistant: Something.### Human: Again?")
    assert not any("prompt_only" in r for r in rows)
    # a root prompt without a reply is still not a conversation
    assert (counts.written, counts.dropped["no assistant reply"], counts.ended_on_prompter) == (3, 1, 2)
    assert "2 paths ended on a prompter message (that message kept)" in counts.summary()


def _flat_rows():
    return [json.loads(x) for x in FLAT.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_flat_table_without_dates_ties_by_line_order(tmp_path):
    # t2's "Blue." (line 14) and "Red." (line 15) tie on rank 1; with dates "Red." (earlier) wins and
    # the path goes on to a prompter; without them the first line wins and the path ends on "Blue.".
    rows = _flat_rows()
    for m in rows:
        m["created_date"] = None
        m["deleted"] = m["deleted"] or None  # null deleted = not deleted
    out, counts = conversations(_write(tmp_path / "null_dates.jsonl", rows))
    assert [r["id"] for r in out] == ["t1", "t5", "t2"]
    assert out[:2] == EXPECTED[:2]
    assert out[2]["messages"] == _conv("Name a colour.", "Blue.")
    assert counts.ended_on_prompter == 0
    for m in rows:
        m.pop("created_date")
    assert conversations(_write(tmp_path / "no_dates.jsonl", rows))[0] == out
    # siblings that do not all carry a date are ordered by line, not by the dates some have
    rows = _flat_rows()
    next(m for m in rows if m["message_id"] == "t2-b2").pop("created_date")
    out, _ = conversations(_write(tmp_path / "one_date_missing.jsonl", rows))
    assert out[2]["messages"] == _conv("Name a colour.", "Blue.")


def test_keep_unanswered_prompt_on_the_flat_table(tmp_path):
    rows, counts = conversations(FLAT, keep_unanswered_prompt=True)
    assert rows[:2] == EXPECTED[:2]
    assert rows[2]["messages"] == _conv("Name a colour.", "Red.", "Why red?")
    assert rows[2]["text"] == "### Human: Name a colour.### Assistant: Red.### Human: Why red?"
    assert counts.ended_on_prompter == 1 and counts.written == 3
    out = tmp_path / "guanaco_form.jsonl"
    prepare_oasst1(FLAT_GZ, out, keep_unanswered_prompt=True)
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == rows


def test_lang_filter_uses_the_root_prompt_language():
    rows, counts = conversations(FLAT, langs=["en"])
    assert [r["id"] for r in rows] == ["t1", "t2"]
    assert counts.dropped["language"] == 1
    rows, _ = conversations(TREES, langs=["de", "fr"])
    assert [r["id"] for r in rows] == ["t5"]


def test_tree_state_absent_means_every_tree_is_used(tmp_path):
    # t3 is only excluded because of its tree_state; without the field it is a normal tree.
    src = tmp_path / "no_state.jsonl"
    lines = [json.loads(x) for x in FLAT.read_text().splitlines()]
    for m in lines:
        m.pop("tree_state")
    src.write_text("".join(json.dumps(m) + "\n" for m in lines))
    rows, counts = conversations(src)
    assert [r["id"] for r in rows] == ["t1", "t5", "t2", "t3"]
    assert rows[-1]["messages"] == _conv("A tree still growing.", "An answer in an aborted tree.")
    assert counts.dropped["tree_state not ready_for_export"] == 0


def test_float_ranks_and_naive_dates_as_pandas_exports_them(tmp_path):
    src = tmp_path / "pandas.jsonl"
    base = {"message_tree_id": "r", "lang": "en", "deleted": False, "review_count": 1}
    rows = [
        dict(base, message_id="r", parent_id=None, role="prompter", text="Q", rank=None,
             created_date="2023-01-01T00:00:00"),
        dict(base, message_id="r-b", parent_id="r", role="assistant", text="B", rank=1.0,
             created_date="2023-01-01T00:00:01"),
        dict(base, message_id="r-a", parent_id="r", role="assistant", text="A", rank=0.0,
             created_date="2023-01-01T00:00:02+00:00"),
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = conversations(src)
    assert out[0]["messages"] == _conv("Q", "A")


def test_prepare_writes_jsonl_in_input_order(tmp_path):
    out = tmp_path / "sub" / "oasst1.jsonl"
    counts = prepare_oasst1(TREES, out)
    assert [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] == EXPECTED
    assert "6 trees read, 3 conversations written" in counts.summary()
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temp file left over


BAD = [
    ("bad_oasst1_json.jsonl", ":3: invalid JSON"),
    ("bad_oasst1_missing_field.jsonl", ":2: role: missing"),
    ("bad_oasst1_missing_parent.jsonl", ":2: parent_id: missing"),  # no created_date: still checked
    ("bad_oasst1_missing_text.trees.jsonl", ":1: prompt.replies[0].text: missing"),
    ("bad_oasst1_rank_type.jsonl", ":2: rank: must be a number or null"),
    ("bad_oasst1_rank_type.trees.jsonl", ":2: prompt.replies[0].replies[1].rank: must be a number or null"),
    ("bad_oasst1_parent.jsonl", ":3: parent_id: no message with id 'x-zz'"),
    ("bad_oasst1_cycle.jsonl", ":3: parent_id: parent cycle (x-p2 -> x-a3 -> x-p2)"),
    ("bad_oasst1_roles.jsonl", ":3: role: roles must alternate"),
    ("bad_oasst1_latin1.jsonl", ":2: not UTF-8 text"),
    ("bad_empty.jsonl", ": empty file"),
    ("bad_lima_missing.jsonl", ":1: conversations: this is not OASST1 data"),
]


@pytest.mark.parametrize("name,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_file_line_and_field(tmp_path, name, message):
    out = tmp_path / "out.jsonl"
    out.write_text("existing\n")
    with pytest.raises(DataError) as e:
        prepare_oasst1(FIXTURES / name, out)
    assert str(e.value).startswith(f"{FIXTURES / name}{message}")
    assert "\n" not in str(e.value)
    assert out.read_text() == "existing\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_gzip_detected_by_content_and_corrupt_gzip_reported(tmp_path):
    renamed = tmp_path / "messages.jsonl"  # gzip bytes without the .gz suffix
    shutil.copy(FLAT_GZ, renamed)
    assert conversations(renamed)[0] == EXPECTED
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(FLAT.read_bytes())[:300])
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz:\d+: not a valid gzip stream"):
        conversations(broken)


def test_second_root_and_duplicate_id_rejected(tmp_path):
    lines = FLAT.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"dup\.jsonl:25: message_id: duplicate id 't1-a1' \(first at line 3\)"):
        conversations(dup)
    two_roots = tmp_path / "roots.jsonl"
    extra = json.loads(lines[0]) | {"message_id": "t1-bis"}
    two_roots.write_text("\n".join(lines + [json.dumps(extra)]) + "\n")
    with pytest.raises(DataError, match=r"roots\.jsonl:25: parent_id: tree 't1' already has a root prompt"):
        conversations(two_roots)
