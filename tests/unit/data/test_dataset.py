"""load_datasets: path resolution, deterministic eval split, drops counted, tokens counted."""
from __future__ import annotations

import json
import logging

import pytest

from qlora_lab.config import load_config
from qlora_lab.data import load_datasets, prepare_lima, prepare_oasst1
from qlora_lab.data.dataset import resolve_data_path
from qlora_lab.errors import DataError
from qlora_lab.presets import byte_tokenizer

from .conftest import CONFIGS, FIXTURES, SAMPLES


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIGS / "tiny_llama_lora.yaml")  # train_file: qlora_lab:samples/tiny_sft.jsonl


def _rows(ds):
    return [tuple(x) for x in ds["input_ids"]]


def test_tiny_config_loads_with_a_deterministic_eval_split(cfg, tok, caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative train_file resolves against the repo root, not the cwd
    with caplog.at_level(logging.INFO, logger="qlora_lab.data"):
        train, ev, stats = load_datasets(cfg, tok)
    assert (len(train), len(ev)) == (20, 4) == (stats["n_train"], stats["n_eval"])
    assert set(train.column_names) == {"input_ids", "labels"}
    assert stats["train_file"] == str(SAMPLES / "tiny_sft.jsonl")  # the packaged sample
    assert stats["dropped_truncated"] == stats["dropped_no_assistant"] == 0
    total = sum(len(x) for x in train["input_ids"])
    trained = sum(1 for lab in train["labels"] for t in lab if t != -100)
    assert (stats["tokens_trained"], stats["tokens_masked"]) == (trained, total - trained) and trained > 0
    assert stats["max_len"] == max(len(x) for x in list(train["input_ids"]) + list(ev["input_ids"])) <= 128
    assert all(x[-1] == tok.eos_token_id for x in train["input_ids"])
    line = [r.getMessage() for r in caplog.records if r.name == "qlora_lab.data"]
    assert len(line) == 1 and line[0].startswith("data: 20 train / 4 eval examples from tiny_sft.jsonl")

    again, ev2, _ = load_datasets(cfg, tok)
    assert _rows(again) == _rows(train) and _rows(ev2) == _rows(ev)
    _, ev3, _ = load_datasets(cfg.set("train.seed=7"), tok)
    assert set(_rows(ev3)) != set(_rows(ev))
    assert not set(_rows(ev)) & set(_rows(train))


def test_eval_size_forms_and_max_examples(cfg, tok):
    _, ev, stats = load_datasets(cfg.set("data.eval_size=0"), tok)
    assert ev is None and stats["n_train"] == 24 and stats["n_eval"] == 0
    _, ev, _ = load_datasets(cfg.set("data.eval_size=0.25"), tok)
    assert len(ev) == 6
    train, ev, _ = load_datasets(cfg.set("data.max_examples=5"), tok)
    assert (len(train), len(ev)) == (5, 4)
    with pytest.raises(DataError, match="data.eval_size: holding out 24 of the 24 rows"):
        load_datasets(cfg.set("data.eval_size=24"), tok)


def test_prompt_only_and_truncated_rows_are_dropped_and_counted(cfg, tok, tmp_path):
    lima = tmp_path / "lima.jsonl"
    prepare_lima(FIXTURES / "lima_sample.jsonl", lima)
    c = cfg.set(f"data.train_file={lima}", "data.eval_size=0", "data.format=lima_eot")
    train, _, stats = load_datasets(c, tok)
    assert (stats["n_train"], stats["dropped_no_assistant"], stats["dropped_truncated"]) == (4, 1, 0)
    # 23 tokens: the 4-turn row (first answer "4." after BOS + 21 prompt bytes) survives; the longer
    # first prompts leave no answer token and are dropped, not kept as all-masked rows
    train, _, stats = load_datasets(c.set("data.max_length=23"), tok)
    assert (stats["n_train"], stats["dropped_truncated"]) == (1, 3)
    assert all(any(t != -100 for t in lab) for lab in train["labels"])
    with pytest.raises(DataError, match=r"no training example left \(dropped 1 without an answer, 4 whose"):
        load_datasets(c.set("data.max_length=8"), tok)


def test_conversations_ending_on_a_user_turn_train_on_the_answers_only(cfg, tok, tmp_path):
    # the Guanaco form (`data oasst1 --keep-unanswered-prompt`): two of three rows end on a user turn
    data = tmp_path / "guanaco_form.jsonl"
    prepare_oasst1(FIXTURES / "oasst1_export_no_dates.trees.jsonl", data, keep_unanswered_prompt=True)
    rows = [json.loads(x)["messages"] for x in data.read_text(encoding="utf-8").splitlines()]
    assert [m[-1]["role"] for m in rows] == ["assistant", "user", "user"]
    train, _, stats = load_datasets(cfg.set(f"data.train_file={data}", "data.eval_size=0",
                                            "data.format=guanaco", "data.max_length=512"), tok)
    assert (stats["n_train"], stats["dropped_no_assistant"], stats["dropped_truncated"]) == (3, 0, 0)
    for messages, ids, labels in zip(rows, train["input_ids"], train["labels"]):
        trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        answers = "".join(f" {m['content']}</s>" for m in messages if m["role"] == "assistant")
        assert trained == answers
    assert tok.decode(train["input_ids"][1]).endswith("### Human: Now explain it to a dog### Assistant:")
    assert train["labels"][1][-1] == -100


def test_eval_file_and_cwd_first_resolution(cfg, tok, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rows = [json.loads(x) for x in (SAMPLES / "tiny_sft.jsonl").read_text().splitlines()][:3]
    (tmp_path / "data" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, ev, stats = load_datasets(cfg.set("data.train_file=data/tiny.jsonl", "data.eval_file=data/tiny.jsonl"), tok)
    assert len(train) == 3 and len(ev) == 3  # relative paths: the current directory first
    assert stats["train_file"] == stats["eval_file"] == str(tmp_path / "data" / "tiny.jsonl")


def test_a_packaged_sample_is_named_by_qlora_lab_prefix(cfg, tok):
    from qlora_lab.errors import DataError

    assert resolve_data_path("qlora_lab:samples/tiny_sft.jsonl", cfg, "train_file") == SAMPLES / "tiny_sft.jsonl"
    with pytest.raises(DataError, match="data.train_file: qlora_lab:samples/nope.jsonl: no such file among"):
        resolve_data_path("qlora_lab:samples/nope.jsonl", cfg, "train_file")


def test_missing_and_bad_files_name_the_key_or_the_line(cfg, tok):
    with pytest.raises(DataError, match="data.train_file: not set"):
        load_datasets(cfg.set("data.train_file=null"), tok)
    with pytest.raises(DataError, match="data.train_file: nope/missing.jsonl: file not found"):
        load_datasets(cfg.set("data.train_file=nope/missing.jsonl"), tok)
    with pytest.raises(DataError, match="data.eval_file: gone.jsonl: file not found"):
        load_datasets(cfg.set("data.eval_file=gone.jsonl"), tok)
    bad = FIXTURES / "bad_prepared_roles.jsonl"
    with pytest.raises(DataError, match=r"bad_prepared_roles\.jsonl:2: messages\[1\]\.role: roles must alternate"):
        load_datasets(cfg.set(f"data.train_file={bad}"), tok)
    raw = FIXTURES / "lima_sample.jsonl"  # not prepared: no messages field
    with pytest.raises(DataError, match=r"lima_sample\.jsonl:1: messages: missing"):
        load_datasets(cfg.set(f"data.train_file={raw}"), tok)
