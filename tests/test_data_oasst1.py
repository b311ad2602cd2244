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
    assert (counts.trees_read, counts.written, counts.trimmed_prompter) == (6, 3, 1)
    assert dict(counts.dropped) == {"root deleted": 1, "tree_state not ready_for_export": 1,
                                    "language": 0, "no assistant reply": 1}


def test_trailing_prompter_is_the_smallest_id_of_a_full_tie():
    # Without the trim the path would end on t2-c1 ("Why red?"), not t2-c2: same rank (none), same date.
    label, messages, _ = read_messages(FLAT)
    roots = build_trees(messages, label)
    assert [m.id for m in best_path(roots["t2"])] == ["t2", "t2-b3", "t2-c1"]
    assert [m.id for m in best_path(roots["t1"])] == ["t1", "t1-a2", "t1-p3", "t1-a6"]


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
