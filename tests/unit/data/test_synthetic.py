"""Synthetic OASST1 / LIMA files: real pipeline, real counts, length profile, determinism."""
from __future__ import annotations

import json

import pytest

from qlora_lab.cli import main
from qlora_lab.config import load_config
from qlora_lab.data.stats import length_stats, tokenizer_for
from qlora_lab.data.synthetic import LIMA, OASST1, generate

from .conftest import CONFIGS


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _stats(prepared, fmt):
    # tiny-llama: the byte tokenizer with BOS, as the llama2-7b random-init model reads the data
    cfg = load_config(CONFIGS / "tiny_llama_lora.yaml", [f"data.format={fmt}"])
    return length_stats(prepared, tokenizer_for(cfg), cfg.data)


def _near_profile(st, p, threshold):
    over = sum(n > threshold for n in st.lengths) / len(st.lengths)
    assert st.percentile(50) == pytest.approx(p.median, rel=0.05)
    assert st.percentile(90) == pytest.approx(p.p90, rel=0.08)
    assert max(st.lengths) == p.max
    assert over == pytest.approx(p.over, abs=0.03)


def test_oasst1_trees_give_one_best_path_each_with_the_real_profile(tmp_path, capsys):
    raw, prepared = tmp_path / "synth.trees.jsonl", tmp_path / "best.jsonl"
    assert main(["data", "synth", "oasst1", "-o", str(raw), "-n", "500"]) == 0
    assert main(["data", "oasst1", str(raw), "-o", str(prepared)]) == 0
    assert "500 trees read, 500 conversations written; dropped 0 trees" in capsys.readouterr().out
    trees, rows = _lines(raw), _lines(prepared)
    assert [r["id"] for r in rows] == [t["message_tree_id"] for t in trees]
    # the selection follows rank 0, which is often neither the first listed nor the earliest reply
    branched = [t["prompt"]["replies"] for t in trees if len(t["prompt"]["replies"]) > 1]
    assert len(branched) > 300
    for tree, row in zip(trees, rows):
        replies = tree["prompt"]["replies"]
        best = next(r for r in replies if r["rank"] in (0, None) and not r["deleted"])
        assert row["messages"][1]["content"] == best["text"]
    assert sum(r[0]["rank"] != 0 for r in branched) > 100
    assert sum(min(r, key=lambda m: m["created_date"])["rank"] != 0 for r in branched) > 100
    assert sum(len(r["messages"]) > 2 for r in rows) == round(OASST1.multi * 500)  # 30% multi-turn
    _near_profile(_stats(prepared, "guanaco"), OASST1, 512)


def test_flat_table_and_nested_trees_select_the_same_paths(tmp_path):
    for form in ([], ["--flat"]):
        raw, best = tmp_path / f"raw{len(form)}.jsonl", tmp_path / f"best{len(form)}.jsonl"
        assert main(["data", "synth", "oasst1", "-o", str(raw), "-n", "60", *form]) == 0
        assert main(["data", "oasst1", str(raw), "-o", str(best)]) == 0
    assert (tmp_path / "best0.jsonl").read_bytes() == (tmp_path / "best1.jsonl").read_bytes()
    assert all("created_date" in m for m in _lines(tmp_path / "raw1.jsonl"))


def test_lima_full_size_counts_and_profile(tmp_path, capsys):
    raw, prepared = tmp_path / "lima.jsonl", tmp_path / "prepared.jsonl"
    assert main(["data", "synth", "lima", "-o", str(raw)]) == 0
    assert main(["data", "lima", str(raw), "-o", str(prepared)]) == 0
    assert "1030 rows read, 1030 conversations written (30 multi-turn, 0 prompt-only" in capsys.readouterr().out
    _near_profile(_stats(prepared, "lima_eot"), LIMA, 1024)


def test_lima_reduced_and_test_split(tmp_path):
    from qlora_lab.data.lima import conversations

    raw = tmp_path / "lima500.jsonl"
    assert main(["data", "synth", "lima", "-o", str(raw), "-n", "500"]) == 0
    rows, counts = conversations(raw)
    assert (counts.written, counts.multi_turn) == (500, round(30 / 1030 * 500))
    test = tmp_path / "test.jsonl"
    assert main(["data", "synth", "lima", "--split", "test", "-o", str(test)]) == 0
    _, counts = conversations(test)
    assert (counts.written, counts.prompt_only) == (300, 300)


def test_same_seed_same_rows_other_seed_or_split_other_rows():
    a = generate("oasst1", "validation", seed=3, n=40)
    assert a == generate("oasst1", "validation", seed=3, n=40)
    assert a != generate("oasst1", "validation", seed=4, n=40)
    assert generate("lima", "train", n=40) != generate("lima", "test", n=40)
    assert len(generate("oasst1", "validation")) == 518


def test_unknown_split_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "synth", "lima", "--split", "validation", "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "lima has splits train, test" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()
