"""`qlora-lab data ...` end to end through the real CLI; bad input through cli.main in this process."""
from __future__ import annotations

import json
import re

import pytest

from .conftest import CONFIGS, FIXTURES


def test_oasst1_with_lang_writes_the_english_best_paths(tmp_path, cli):
    out = tmp_path / "oasst1.jsonl"
    r = cli("data", "oasst1", FIXTURES / "oasst1_messages.jsonl.gz", "-o", out, "--lang", "en")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["id"], len(x["messages"])) for x in rows] == [("t1", 4), ("t2", 2)]
    assert rows[1]["text"] == "### Human: Name a colour.### Assistant: Red."
    assert "6 trees read, 2 conversations written; dropped 4 trees" in r.stdout
    assert "language 1" in r.stdout and "tree_state not ready_for_export 1" in r.stdout


def test_oasst1_keep_unanswered_prompt_on_an_export_without_dates(tmp_path, cli):
    src = FIXTURES / "oasst1_export_no_dates.trees.jsonl"
    out, kept = tmp_path / "default.jsonl", tmp_path / "guanaco_form.jsonl"
    r = cli("data", "oasst1", src, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "2 paths ended on a prompter message (that message dropped)" in r.stdout
    r = cli("data", "oasst1", src, "-o", kept, "--keep-unanswered-prompt")
    assert r.returncode == 0, r.stderr
    assert "5 trees read, 3 conversations written" in r.stdout
    assert "2 paths ended on a prompter message (that message kept)" in r.stdout
    default = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    rows = [json.loads(x) for x in kept.read_text(encoding="utf-8").splitlines()]
    assert [x["messages"][-1]["role"] for x in default] == ["assistant"] * 3
    assert [x["messages"][-1]["role"] for x in rows] == ["assistant", "user", "user"]
    assert rows[1]["text"].endswith("### Assistant: Masses pull on each other.### Human: Now explain it to a dog")
    assert [x["messages"][:-1] for x in rows[1:]] == [x["messages"] for x in default[1:]]


def test_lima_then_stats_with_histogram_png(tmp_path, cli):
    out = tmp_path / "lima.jsonl"
    r = cli("data", "lima", FIXTURES / "lima_sample.jsonl", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "5 rows read, 5 conversations written (1 multi-turn, 1 prompt-only" in r.stdout
    png = tmp_path / "hist.png"
    r = cli("data", "stats", out, "--config", CONFIGS / "tiny_llama_lora.yaml",
                "--set", "data.format=lima_eot", "--set", "data.max_length=64", "--png", png, "--bins", "4")
    assert r.returncode == 0, r.stderr
    assert "5 rows, 4 with an answer, 1 prompt-only" in r.stdout
    # byte tokenizer: BOS, then per turn the UTF-8 bytes of "{user} [EOT] {answer}", then EOS
    convs = [json.loads(x)["conversations"] for x in (FIXTURES / "lima_sample.jsonl").read_text().splitlines()]
    lengths = [1 + sum(len(f"{u} [EOT] {a}".encode()) + 1 for u, a in zip(c[::2], c[1::2]))
               for c in convs if len(c) > 1]
    assert f"min {min(lengths)}, median" in r.stdout and f"max {max(lengths)};" in r.stdout
    assert "longer than data.max_length=64: 4 rows (100.0%) would be truncated" in r.stdout
    hist = [x for x in r.stdout.splitlines() if re.match(r"\s*\d+-\d+ ", x)]
    counts = [int(x.split("  <-")[0].split()[-1]) for x in hist]
    assert len(hist) == 4 and sum(counts) == 4
    bounds = [tuple(int(v) for v in x.split()[0].split("-")) for x in hist]
    marked = [lo <= 64 <= hi for lo, hi in bounds]
    assert [x.endswith("<- max_length") for x in hist] == marked and sum(marked) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


BAD = [
    ("oasst1", "bad_oasst1_json.jsonl", ":3: invalid JSON"),
    ("oasst1", "bad_oasst1_latin1.jsonl", ":2: not UTF-8 text"),
    ("oasst1", "bad_oasst1_cycle.jsonl", ":3: parent_id: parent cycle"),
    ("oasst1", "bad_oasst1_rank_type.trees.jsonl", ":2: prompt.replies[0].replies[1].rank: must be"),
    ("oasst1", "bad_oasst1_missing_text.trees.jsonl", ":1: prompt.replies[0].text: missing"),
    ("lima", "bad_lima_turn_type.jsonl", ":2: conversations[1]: must be a string"),
    ("lima", "bad_empty.jsonl", ": empty file"),
]


@pytest.mark.parametrize("verb,name,message", BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_one_line_and_leaves_output_alone(tmp_path, verb, name, message, cli):
    out = tmp_path / "out.jsonl"
    out.write_text('{"keep": "me"}\n')
    r = cli("data", verb, FIXTURES / name, "-o", out)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()]  # one line, no traceback
    assert r.stderr.startswith(f"qlora-lab: error: {FIXTURES / name}{message}")
    assert out.read_text() == '{"keep": "me"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_stats_on_a_bad_prepared_file_and_missing_input(tmp_path, cli):
    r = cli("data", "stats", FIXTURES / "bad_prepared_roles.jsonl", "--config", CONFIGS / "tiny_llama_lora.yaml")
    assert r.returncode == 2 and "bad_prepared_roles.jsonl:2: messages[1].role: roles must alternate" in r.stderr
    r = cli("data", "oasst1", tmp_path / "nope.jsonl", "-o", tmp_path / "o.jsonl")
    assert r.returncode == 2 and r.stderr.strip() == f"qlora-lab: error: {tmp_path / 'nope.jsonl'}: file not found"
