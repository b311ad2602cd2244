"""Prepared JSONL -> tokenized train / eval `datasets.Dataset`s for the trainer.

    train_ds, eval_ds, stats = load_datasets(cfg, tokenizer)

Each row becomes ``input_ids`` and ``labels`` (-100 where not trained). A row without an answer
(a prompt-only LIMA test row) and a row whose answer is truncated away entirely are dropped and
counted, never trained on as an all-masked example (it would only dilute the loss average).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ..errors import DataError, where
from ..fileio import resource
from .conversation import check_messages, has_answer
from .formats import IGNORE, tokenize_conversation
from .jsonl import read_records

log = logging.getLogger("qlora_lab.data")


PACKAGED = "qlora_lab:"  # data.train_file: qlora_lab:samples/tiny_sft.jsonl = a file shipped with the package


def resolve_data_path(value: Optional[str], cfg, key: str) -> Path:
    """A data path from the config: `qlora_lab:NAME` (a sample shipped in the package's resources/),
    absolute, or relative to the current directory, then to the repo root (the folder above the config
    file's folder, as configs/ sits in the repo root)."""
    if not value:
        raise DataError(f"data.{key}: not set; write a prepared file with `qlora-lab data oasst1` or "
                        f"`qlora-lab data lima` and point data.{key} at it")
    if value.startswith(PACKAGED):
        p = resource(*value[len(PACKAGED):].split("/"))
        if not p.is_file():
            raise DataError(f"data.{key}: {value}: no such file among the package's samples ({p})")
        return p
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p]
    if not p.is_absolute() and cfg.source and Path(cfg.source).is_file():
        candidates.append(Path(cfg.source).resolve().parent.parent / p)
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"data.{key}: {value}: file not found (looked at {looked})")


def check_data_files(cfg) -> None:
    """The data files the config names exist and hold a record: checked before a run folder is made,
    so a wrong path or an empty file is one error line and leaves nothing behind."""
    import contextlib

    for key in ("train_file", "eval_file"):
        value = getattr(cfg.data, key)
        if key == "train_file" or value:
            path = resolve_data_path(value, cfg, key)
            with contextlib.closing(read_records(path)) as records:
                next(records)  # an empty file raises DataError naming it


def read_prepared(path) -> list[list[dict]]:
    """The `messages` of every row of a prepared JSONL/JSON file, validated with line numbers."""
    out = []
    for line, row in read_records(path):
        if "messages" not in row:
            raise DataError(f"{where(path, line, 'messages')}: missing (a prepared file has one "
                            f"conversation per line: {{\"messages\": [{{role, content}}, ...]}})")
        out.append(check_messages(row["messages"], path, line))
    return out


def _load_json(path: Path):
    """The file through `datasets` (Arrow, memory-mapped), after the strict line-numbered check."""
    from datasets import load_dataset

    read_prepared(path)
    try:
        ds = load_dataset("json", data_files=str(path), split="train")
    except Exception as e:  # e.g. a column whose type changes from row to row
        raise DataError(f"{path}: datasets could not load it: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return ds.select_columns(["messages"])


def tokenize_rows(messages_list, tokenizer, data_cfg) -> tuple[dict, dict]:
    """({"input_ids": [...], "labels": [...]}, counts) for a sequence of conversations."""
    cols = {"input_ids": [], "labels": []}
    c = {"dropped_truncated": 0, "dropped_no_assistant": 0, "tokens_trained": 0, "tokens_masked": 0,
         "max_len": 0}
    for messages in messages_list:
        if not has_answer(messages):
            c["dropped_no_assistant"] += 1
            continue
        ex = tokenize_conversation(messages, tokenizer, data_cfg.format, data_cfg.max_length,
                                   truncation_side=data_cfg.truncation_side,
                                   train_on_inputs=data_cfg.train_on_inputs)
        if ex is None:
            c["dropped_truncated"] += 1
            continue
        cols["input_ids"].append(ex["input_ids"])
        cols["labels"].append(ex["labels"])
        trained = sum(1 for t in ex["labels"] if t != IGNORE)
        c["tokens_trained"] += trained
        c["tokens_masked"] += len(ex["labels"]) - trained
        c["max_len"] = max(c["max_len"], len(ex["input_ids"]))
    return cols, c


def _eval_rows(n: int, eval_size) -> int:
    if isinstance(eval_size, float):
        return max(1, round(eval_size * n)) if eval_size > 0 else 0
    return int(eval_size)


def load_datasets(cfg, tokenizer):
    """(train Dataset, eval Dataset or None, stats dict). Deterministic given cfg.train.seed."""
    from datasets import Dataset

    d = cfg.data
    train_path = resolve_data_path(d.train_file, cfg, "train_file")
    raw = _load_json(train_path)
    eval_path = None
    if d.eval_file:
        eval_path = resolve_data_path(d.eval_file, cfg, "eval_file")
        train_raw, eval_raw = raw, _load_json(eval_path)
    else:
        n_eval = _eval_rows(len(raw), d.eval_size)
        if n_eval >= len(raw):
            raise DataError(f"data.eval_size: holding out {n_eval} of the {len(raw)} rows of {train_path} "
                            f"leaves nothing to train on")
        if n_eval:
            split = raw.train_test_split(test_size=n_eval, seed=cfg.train.seed, shuffle=True)
            train_raw, eval_raw = split["train"], split["test"]
        else:
            train_raw, eval_raw = raw, None
    if d.max_examples is not None:
        train_raw = train_raw.select(range(min(d.max_examples, len(train_raw))))

    train_cols, stats = tokenize_rows(train_raw["messages"], tokenizer, d)
    if not train_cols["input_ids"]:
        raise DataError(f"{train_path}: no training example left (dropped {stats['dropped_no_assistant']} "
                        f"without an answer, {stats['dropped_truncated']} whose answer data.max_length="
                        f"{d.max_length} cut away)")
    train_ds = Dataset.from_dict(train_cols)
    eval_ds, eval_stats = None, {}
    if eval_raw is not None:
        eval_cols, eval_stats = tokenize_rows(eval_raw["messages"], tokenizer, d)
        if eval_cols["input_ids"]:
            eval_ds = Dataset.from_dict(eval_cols)
        else:
            log.warning("data: every eval row was dropped (no answer, or truncated away); no eval loss")
    stats.update(
        n_train=len(train_ds), n_eval=0 if eval_ds is None else len(eval_ds),
        eval_dropped_truncated=eval_stats.get("dropped_truncated", 0),
        eval_dropped_no_assistant=eval_stats.get("dropped_no_assistant", 0),
        max_len=max(stats["max_len"], eval_stats.get("max_len", 0)),
        train_file=str(train_path), eval_file=None if eval_path is None else str(eval_path))
    log.info(
        "data: %d train / %d eval examples from %s (%s, max_length %d, %s truncation); dropped %d "
        "without an answer, %d truncated away; train tokens: %d trained, %d masked; longest %d",
        stats["n_train"], stats["n_eval"], train_path.name, d.format, d.max_length, d.truncation_side,
        stats["dropped_no_assistant"], stats["dropped_truncated"], stats["tokens_trained"],
        stats["tokens_masked"], stats["max_len"])
    return train_ds, eval_ds, stats
